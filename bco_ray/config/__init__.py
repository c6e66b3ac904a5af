"""The typed job config: the dataclasses and loader (schema), their checks (checks), their --help docs (doc)."""
