"""One module per subcommand; each imports its stage inside the command, when it runs."""
