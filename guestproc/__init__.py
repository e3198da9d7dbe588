"""The guest kernel: Linux's virtio-net driver over legacy virtio-pci, and a small stack."""
