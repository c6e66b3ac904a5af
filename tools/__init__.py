"""Developer tools, not part of the runtime package: asset builders and the docs generator."""
