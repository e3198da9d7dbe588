"""The tool around the replica: command line, supervisor, host-side helpers, trace files."""
