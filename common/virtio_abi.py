"""Stands for include/uapi/linux/virtio_pci.h, virtio_config.h and virtio_net.h: the legacy
I/O BAR and the virtio 1.0 (modern) capabilities and common configuration structure."""

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
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
# transport features (virtio_config.h): bits 28..41; the modern transport's are above 31
VIRTIO_TRANSPORT_F_START = 28
VIRTIO_TRANSPORT_F_END = 42
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_NET_F_GSO = 6

FEATURE_NAMES = {
    VIRTIO_NET_F_CSUM: "VIRTIO_NET_F_CSUM",
    VIRTIO_NET_F_GUEST_CSUM: "VIRTIO_NET_F_GUEST_CSUM",
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
    VIRTIO_NET_F_MAC: "VIRTIO_NET_F_MAC",
    VIRTIO_NET_F_MRG_RXBUF: "VIRTIO_NET_F_MRG_RXBUF",
    VIRTIO_NET_F_STATUS: "VIRTIO_NET_F_STATUS",
    VIRTIO_NET_F_CTRL_VQ: "VIRTIO_NET_F_CTRL_VQ",
    VIRTIO_NET_F_CTRL_RX: "VIRTIO_NET_F_CTRL_RX",
    VIRTIO_NET_F_CTRL_VLAN: "VIRTIO_NET_F_CTRL_VLAN",
    VIRTIO_NET_F_CTRL_RX_EXTRA: "VIRTIO_NET_F_CTRL_RX_EXTRA",
    VIRTIO_NET_F_GUEST_ANNOUNCE: "VIRTIO_NET_F_GUEST_ANNOUNCE",
    VIRTIO_NET_F_MQ: "VIRTIO_NET_F_MQ",
    VIRTIO_NET_F_CTRL_MAC_ADDR: "VIRTIO_NET_F_CTRL_MAC_ADDR",
    VIRTIO_F_NOTIFY_ON_EMPTY: "VIRTIO_F_NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "VIRTIO_F_ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "VIRTIO_RING_F_INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "VIRTIO_RING_F_EVENT_IDX",
    VIRTIO_F_VERSION_1: "VIRTIO_F_VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "VIRTIO_F_ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "VIRTIO_F_RING_PACKED",
}


def feature_names(bits: int) -> list[str]:
    return [name for bit, name in sorted(FEATURE_NAMES.items()) if bits & (1 << bit)]


# virtio_net.h
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
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
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0


# -- virtio 1.0 over PCI (virtio_pci.h): vendor capabilities naming regions of a memory BAR -----

PCI_DEVICE_ID_VIRTIO_NET_MODERN = 0x1041
"""A modern-only (non-transitional) virtio-net function: 0x1040 + VIRTIO_ID_NET, revision 1."""
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset,
# length (le32); struct virtio_pci_notify_cap adds notify_off_multiplier (le32)
VIRTIO_PCI_CAP = struct.Struct("<BBBBBB2xII")
VIRTIO_PCI_CAP_VNDR = 0
VIRTIO_PCI_CAP_NEXT = 1
VIRTIO_PCI_CAP_LEN = 2
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_NOTIFY_CAP_MULT = 16
VIRTIO_PCI_NOTIFY_CAP_SIZE = 20
VIRTIO_PCI_CFG_CAP_SIZE = 20  # struct virtio_pci_cfg_cap: the cap and pci_cfg_data[4]

# struct virtio_pci_common_cfg, field offsets (virtio_pci_modern.h's VIRTIO_PCI_COMMON_*)
VIRTIO_PCI_COMMON_DFSELECT = 0  # le32 device_feature_select
VIRTIO_PCI_COMMON_DF = 4  # le32 device_feature, read-only
VIRTIO_PCI_COMMON_GFSELECT = 8  # le32 guest_feature_select
VIRTIO_PCI_COMMON_GF = 12  # le32 guest_feature
VIRTIO_PCI_COMMON_MSIX = 16  # le16 msix_config
VIRTIO_PCI_COMMON_NUMQ = 18  # le16 num_queues, read-only
VIRTIO_PCI_COMMON_STATUS = 20  # u8 device_status
VIRTIO_PCI_COMMON_CFGGENERATION = 21  # u8 config_generation, read-only
VIRTIO_PCI_COMMON_Q_SELECT = 22  # le16 queue_select
VIRTIO_PCI_COMMON_Q_SIZE = 24  # le16 queue_size
VIRTIO_PCI_COMMON_Q_MSIX = 26  # le16 queue_msix_vector
VIRTIO_PCI_COMMON_Q_ENABLE = 28  # le16 queue_enable
VIRTIO_PCI_COMMON_Q_NOFF = 30  # le16 queue_notify_off, read-only
VIRTIO_PCI_COMMON_Q_DESCLO = 32  # le32 queue_desc_lo
VIRTIO_PCI_COMMON_Q_DESCHI = 36
VIRTIO_PCI_COMMON_Q_AVAILLO = 40  # le32 queue_avail_lo (the driver area)
VIRTIO_PCI_COMMON_Q_AVAILHI = 44
VIRTIO_PCI_COMMON_Q_USEDLO = 48  # le32 queue_used_lo (the device area)
VIRTIO_PCI_COMMON_Q_USEDHI = 52
VIRTIO_PCI_COMMON_CFG_SIZE = 56

# QEMU's layout of the modern memory BAR (virtio-pci.c: the regions, each 4 KiB)
VIRTIO_PCI_MODERN_MEM_BAR = 4
VIRTIO_PCI_COMMON_OFFSET = 0x0
VIRTIO_PCI_ISR_OFFSET = 0x1000
VIRTIO_PCI_DEVICE_OFFSET = 0x2000
VIRTIO_PCI_NOTIFY_OFFSET = 0x3000
VIRTIO_PCI_MODERN_REGION_SIZE = 0x1000
VIRTIO_PCI_MODERN_BAR_SIZE = 0x4000
QEMU_VIRTIO_PCI_QUEUE_MEM_MULT = 4
"""notify_off_multiplier: queue N's notify address is notify + 4 * N (queue_notify_off = N)."""
SMP_CACHE_BYTES = 64
"""The alignment Linux's modern transport gives a split ring's used ring."""
