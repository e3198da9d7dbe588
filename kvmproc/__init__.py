"""KVM: the vCPU run loop, exit handling, in-kernel ioeventfd/irqfd, the local APIC."""
