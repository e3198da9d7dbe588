"""Stands for include/uapi/linux/virtio_pci.h, virtio_config.h and virtio_net.h (legacy)."""

from __future__ import annotations

import struct

# PCI identity of a legacy ("transitional") virtio-net function
PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_DEVICE_ID_VIRTIO_NET = 0x1000
VIRTIO_ID_NET = 1

# The legacy I/O BAR (BAR0) registers
VIRTIO_PCI_HOST_FEATURES = 0  # u32, read-only
VIRTIO_PCI_GUEST_FEATURES = 4  # u32
VIRTIO_PCI_QUEUE_PFN = 8  # u32
VIRTIO_PCI_QUEUE_NUM = 12  # u16, read-only
VIRTIO_PCI_QUEUE_SEL = 14  # u16
VIRTIO_PCI_QUEUE_NOTIFY = 16  # u16
VIRTIO_PCI_STATUS = 18  # u8
VIRTIO_PCI_ISR = 19  # u8, read clears
VIRTIO_MSI_CONFIG_VECTOR = 20  # u16, only with MSI-X enabled
VIRTIO_MSI_QUEUE_VECTOR = 22  # u16, only with MSI-X enabled
VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
VIRTIO_PCI_VRING_ALIGN = 4096
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2


def virtio_pci_config_off(msix_enabled: bool) -> int:
    """Offset of the device-specific config in the I/O BAR (VIRTIO_PCI_CONFIG_OFF)."""
    return 24 if msix_enabled else 20


VIRTIO_PCI_REGION_SIZE = 32  # the legacy BAR0 with MSI-X registers and 8 bytes of net config

# Device status (virtio_config.h)
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Feature bits (legacy: the low 32)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "VIRTIO_NET_F_CSUM",
    VIRTIO_NET_F_GUEST_CSUM: "VIRTIO_NET_F_GUEST_CSUM",
    VIRTIO_NET_F_MAC: "VIRTIO_NET_F_MAC",
    VIRTIO_NET_F_MRG_RXBUF: "VIRTIO_NET_F_MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "VIRTIO_NET_F_STATUS",
    VIRTIO_NET_F_CTRL_VQ: "VIRTIO_NET_F_CTRL_VQ",
    VIRTIO_NET_F_MQ: "VIRTIO_NET_F_MQ",
    VIRTIO_F_NOTIFY_ON_EMPTY: "VIRTIO_F_NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "VIRTIO_F_ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "VIRTIO_RING_F_INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "VIRTIO_RING_F_EVENT_IDX",
}


def feature_names(bits: int) -> list[str]:
    return [name for bit, name in sorted(FEATURE_NAMES.items()) if bits & (1 << bit)]


# virtio_net.h
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
VIRTIO_NET_HDR_MRG_RXBUF = struct.Struct("<BBHHHHH")  # ... and num_buffers
VIRTIO_NET_CONFIG = struct.Struct("<6sHH")  # mac, status, max_virtqueue_pairs


def virtio_net_hdr_len(mrg_rxbuf: bool) -> int:
    return VIRTIO_NET_HDR_MRG_RXBUF.size if mrg_rxbuf else VIRTIO_NET_HDR.size


# MSI-X capability of the legacy function: the table lives in BAR1 (MMIO), 16 bytes an entry
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1

# The control virtqueue (virtio_net.h)
VIRTIO_NET_CTRL_HDR = struct.Struct("<BB")  # class, cmd
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
