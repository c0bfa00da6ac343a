"""The `pipeline` command line: parses flags and config files, then calls a stage."""
