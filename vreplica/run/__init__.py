"""One run of the replica: its options, QEMU's command line, the supervisor of the three
processes, the host's services, the checks made before it starts, and its summary."""
