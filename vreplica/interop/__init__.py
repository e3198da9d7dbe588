"""The replica's meeting with real implementations: DPDK's testpmd and QEMU 7.2 with Linux 6.1."""
