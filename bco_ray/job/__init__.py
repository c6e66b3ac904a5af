"""One job, driver side: run (the stages in order), checks (before Ray), context, the train stage, preflight,
resources, signals."""
