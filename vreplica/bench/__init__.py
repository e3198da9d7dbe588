"""vreplica bench: the replica's speed against its baselines."""
