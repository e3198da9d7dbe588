"""QEMU: vCPU thread, virtio-pci and virtio-net devices, main loop, net layer, slirp."""
