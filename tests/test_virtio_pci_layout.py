"""The virtio 1.0 PCI structures against the kernel's own ``<linux/virtio_pci.h>``, with gcc.

A C program prints the offsets and sizes of ``struct virtio_pci_cap``,
``virtio_pci_notify_cap``, ``virtio_pci_cfg_cap`` and ``virtio_pci_common_cfg``; a second
one walks the configuration space the QEMU side builds for a modern device, reading each
vendor capability through ``struct virtio_pci_cap`` / ``virtio_pci_notify_cap`` pointers.
The Python constants and the device's bytes are held to what the C compiler says.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common import virtio_abi as abi

HEADER = Path("/usr/include/linux/virtio_pci.h")

FIELDS = {
    "virtio_pci_cap": ("cap_vndr", "cap_next", "cap_len", "cfg_type", "bar", "id", "offset",
                       "length"),
    "virtio_pci_common_cfg": ("device_feature_select", "device_feature",
                              "guest_feature_select", "guest_feature", "msix_config",
                              "num_queues", "device_status", "config_generation",
                              "queue_select", "queue_size", "queue_msix_vector", "queue_enable",
                              "queue_notify_off", "queue_desc_lo", "queue_desc_hi",
                              "queue_avail_lo", "queue_avail_hi", "queue_used_lo",
                              "queue_used_hi"),
}

PY_OFFSETS = {
    ("virtio_pci_cap", "cap_vndr"): abi.VIRTIO_PCI_CAP_VNDR,
    ("virtio_pci_cap", "cap_next"): abi.VIRTIO_PCI_CAP_NEXT,
    ("virtio_pci_cap", "cap_len"): abi.VIRTIO_PCI_CAP_LEN,
    ("virtio_pci_cap", "cfg_type"): abi.VIRTIO_PCI_CAP_CFG_TYPE,
    ("virtio_pci_cap", "bar"): abi.VIRTIO_PCI_CAP_BAR,
    ("virtio_pci_cap", "id"): abi.VIRTIO_PCI_CAP_ID,
    ("virtio_pci_cap", "offset"): abi.VIRTIO_PCI_CAP_OFFSET,
    ("virtio_pci_cap", "length"): abi.VIRTIO_PCI_CAP_LENGTH,
    ("virtio_pci_common_cfg", "device_feature_select"): abi.VIRTIO_PCI_COMMON_DFSELECT,
    ("virtio_pci_common_cfg", "device_feature"): abi.VIRTIO_PCI_COMMON_DF,
    ("virtio_pci_common_cfg", "guest_feature_select"): abi.VIRTIO_PCI_COMMON_GFSELECT,
    ("virtio_pci_common_cfg", "guest_feature"): abi.VIRTIO_PCI_COMMON_GF,
    ("virtio_pci_common_cfg", "msix_config"): abi.VIRTIO_PCI_COMMON_MSIX,
    ("virtio_pci_common_cfg", "num_queues"): abi.VIRTIO_PCI_COMMON_NUMQ,
    ("virtio_pci_common_cfg", "device_status"): abi.VIRTIO_PCI_COMMON_STATUS,
    ("virtio_pci_common_cfg", "config_generation"): abi.VIRTIO_PCI_COMMON_CFGGENERATION,
    ("virtio_pci_common_cfg", "queue_select"): abi.VIRTIO_PCI_COMMON_Q_SELECT,
    ("virtio_pci_common_cfg", "queue_size"): abi.VIRTIO_PCI_COMMON_Q_SIZE,
    ("virtio_pci_common_cfg", "queue_msix_vector"): abi.VIRTIO_PCI_COMMON_Q_MSIX,
    ("virtio_pci_common_cfg", "queue_enable"): abi.VIRTIO_PCI_COMMON_Q_ENABLE,
    ("virtio_pci_common_cfg", "queue_notify_off"): abi.VIRTIO_PCI_COMMON_Q_NOFF,
    ("virtio_pci_common_cfg", "queue_desc_lo"): abi.VIRTIO_PCI_COMMON_Q_DESCLO,
    ("virtio_pci_common_cfg", "queue_desc_hi"): abi.VIRTIO_PCI_COMMON_Q_DESCHI,
    ("virtio_pci_common_cfg", "queue_avail_lo"): abi.VIRTIO_PCI_COMMON_Q_AVAILLO,
    ("virtio_pci_common_cfg", "queue_avail_hi"): abi.VIRTIO_PCI_COMMON_Q_AVAILHI,
    ("virtio_pci_common_cfg", "queue_used_lo"): abi.VIRTIO_PCI_COMMON_Q_USEDLO,
    ("virtio_pci_common_cfg", "queue_used_hi"): abi.VIRTIO_PCI_COMMON_Q_USEDHI,
}

LAYOUT_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/virtio_pci.h>
#include <linux/virtio_config.h>
#define F(s, f) printf("off %s %s %zu\n", #s, #f, offsetof(struct s, f));
#define S(s) printf("size %s %zu\n", #s, sizeof(struct s));
#define C(c) printf("const %s %d\n", #c, (int)(c));
int main(void)
{
%(body)s
    printf("off virtio_pci_notify_cap notify_off_multiplier %zu\n",
           offsetof(struct virtio_pci_notify_cap, notify_off_multiplier));
    S(virtio_pci_cap) S(virtio_pci_notify_cap) S(virtio_pci_cfg_cap) S(virtio_pci_common_cfg)
    C(VIRTIO_PCI_CAP_COMMON_CFG) C(VIRTIO_PCI_CAP_NOTIFY_CFG) C(VIRTIO_PCI_CAP_ISR_CFG)
    C(VIRTIO_PCI_CAP_DEVICE_CFG) C(VIRTIO_PCI_CAP_PCI_CFG) C(VIRTIO_F_VERSION_1)
    C(VIRTIO_F_ACCESS_PLATFORM) C(VIRTIO_F_RING_PACKED)
    return 0;
}
"""

WALK_PROGRAM = r"""
#include <stdio.h>
#include <stdint.h>
#include <linux/virtio_pci.h>
/* the device's 256-byte configuration space on stdin; each vendor capability through the
   kernel's structs, as virtio_pci_find_capability and vp_modern_probe read them */
int main(void)
{
    unsigned char c[256];
    if (fread(c, 1, sizeof c, stdin) != sizeof c)
        return 1;
    for (unsigned pos = c[0x34], n = 0; pos && n < 48; pos = c[pos + 1], n++) {
        if (c[pos] != 0x09)
            continue;
        struct virtio_pci_cap *cap = (struct virtio_pci_cap *)(c + pos);
        unsigned mult = 0;
        if (cap->cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG)
            mult = ((struct virtio_pci_notify_cap *)cap)->notify_off_multiplier;
        printf("cap %u %u %u %u %u %u %u\n", pos, cap->cap_len, cap->cfg_type, cap->bar,
               cap->offset, cap->length, mult);
    }
    return 0;
}
"""


def _build(tmp: Path, name: str, text: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed (the README requires a C compiler)", pytrace=False)
    if not HEADER.is_file():
        pytest.fail(f"{HEADER} is missing (linux-libc-dev)", pytrace=False)
    src = tmp / f"{name}.c"
    src.write_text(text)
    exe = tmp / name
    subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-O1", "-o", str(exe), str(src)],
                   check=True, capture_output=True, timeout=60)
    return exe


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    body = "\n".join(f"    F({s}, {f})" for s, fields in FIELDS.items() for f in fields)
    exe = _build(tmp_path_factory.mktemp("vpci"), "layout",
                 LAYOUT_PROGRAM.replace("%(body)s", body))
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    res: dict[str, Any] = {"off": {}, "size": {}, "const": {}}
    for line in out.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "off":
            res["off"][(rest[0], rest[1])] = int(rest[2])
        else:
            res[kind][rest[0]] = int(rest[1])
    return res


@pytest.mark.timeout(60)
def test_field_offsets_match_kernel(c_layout: dict[str, Any]) -> None:
    """Every offset common.virtio_abi names is offsetof() in the kernel's struct."""
    for key, value in PY_OFFSETS.items():
        assert c_layout["off"][key] == value, key
    assert c_layout["off"][("virtio_pci_notify_cap", "notify_off_multiplier")] \
        == abi.VIRTIO_PCI_NOTIFY_CAP_MULT


@pytest.mark.timeout(60)
def test_struct_sizes_and_constants_match_kernel(c_layout: dict[str, Any]) -> None:
    size, const = c_layout["size"], c_layout["const"]
    assert size["virtio_pci_cap"] == abi.VIRTIO_PCI_CAP.size
    assert size["virtio_pci_notify_cap"] == abi.VIRTIO_PCI_NOTIFY_CAP_SIZE
    assert size["virtio_pci_cfg_cap"] == abi.VIRTIO_PCI_CFG_CAP_SIZE
    assert size["virtio_pci_common_cfg"] == abi.VIRTIO_PCI_COMMON_CFG_SIZE
    assert (const["VIRTIO_PCI_CAP_COMMON_CFG"], const["VIRTIO_PCI_CAP_NOTIFY_CFG"],
            const["VIRTIO_PCI_CAP_ISR_CFG"], const["VIRTIO_PCI_CAP_DEVICE_CFG"],
            const["VIRTIO_PCI_CAP_PCI_CFG"]) == (
        abi.VIRTIO_PCI_CAP_COMMON_CFG, abi.VIRTIO_PCI_CAP_NOTIFY_CFG, abi.VIRTIO_PCI_CAP_ISR_CFG,
        abi.VIRTIO_PCI_CAP_DEVICE_CFG, abi.VIRTIO_PCI_CAP_PCI_CFG)
    assert (const["VIRTIO_F_VERSION_1"], const["VIRTIO_F_ACCESS_PLATFORM"],
            const["VIRTIO_F_RING_PACKED"]) == (abi.VIRTIO_F_VERSION_1,
                                               abi.VIRTIO_F_ACCESS_PLATFORM,
                                               abi.VIRTIO_F_RING_PACKED)


def _modern_config_space(transport: str) -> tuple[bytes, Any]:
    """The configuration space QEMU's side builds for a modern (or transitional) device."""
    from qemuproc.kvm_all import KVMState
    from qemuproc.memory import AddressSpace
    from qemuproc.pci import PCIHostState
    from qemuproc.virtio import VirtIODevice
    from qemuproc.virtio_pci import VirtIOPCIProxy

    io_as, mem_as = AddressSpace("I/O", True), AddressSpace("memory", False)
    vdev = VirtIODevice("virtio-net", abi.VIRTIO_ID_NET, 10, None)  # type: ignore[arg-type]
    proxy = VirtIOPCIProxy(vdev, PCIHostState(io_as), io_as, mem_as,
                           KVMState(None, None),  # type: ignore[arg-type]
                           None, None, 3, True,  # type: ignore[arg-type]
                           disable_legacy=transport == "modern", disable_modern=False)
    return bytes(proxy.pci_dev.config), proxy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["modern", "transitional"])
def test_device_capabilities_read_through_kernel_structs(
        tmp_path: Path, transport: str) -> None:
    """The vendor capabilities name QEMU's regions of BAR 4 (common 0x0, ISR 0x1000, device
    0x2000, notify 0x3000 with multiplier 4, each 0x1000) and the PCI_CFG window, in QEMU's
    order (the list is built head first, so the last added comes first)."""
    config, proxy = _modern_config_space(transport)
    exe = _build(tmp_path, "walk", WALK_PROGRAM)
    out = subprocess.run([str(exe)], input=config, check=True, capture_output=True,
                         timeout=60)
    caps = [[int(x) for x in line.split()[1:]] for line in out.stdout.decode().splitlines()]
    assert caps == [
        [0x84, 20, 5, 0, 0, 0, 0],
        [0x70, 20, 2, 4, 0x3000, 0x1000, 4],
        [0x60, 16, 4, 4, 0x2000, 0x1000, 0],
        [0x50, 16, 3, 4, 0x1000, 0x1000, 0],
        [0x40, 16, 1, 4, 0x0, 0x1000, 0],
    ]
    assert config[0x34] == 0x98 and config[0x98] == 0x11  # MSI-X last, at the list's head
    bar4 = int.from_bytes(config[0x20:0x24], "little")
    assert bar4 & 0xF == 0x4 | 0x8  # 64-bit, prefetchable memory
    device_id = int.from_bytes(config[2:4], "little")
    assert (device_id, config[8]) == ((0x1041, 1) if transport == "modern" else (0x1000, 0))
    assert bool(int.from_bytes(config[0x10:0x14], "little") & 1) == (transport != "modern")
    assert proxy.vdev.host_features >> abi.VIRTIO_F_VERSION_1 & 1
