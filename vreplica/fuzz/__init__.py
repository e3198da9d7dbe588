"""vreplica fuzz: the device's ring handling against a hostile driver."""
