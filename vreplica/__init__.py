"""The tool around the replica: the command line and its subcommands, split by job."""
