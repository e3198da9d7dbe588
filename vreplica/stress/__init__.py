"""vreplica stress: sustained load with chaos, and a verdict."""
