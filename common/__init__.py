"""What the guest, KVM and QEMU processes share: ABI constants, guest memory, IPC, tracing."""
