"""Where the interop peers live: the per-machine cache scripts/setup-peers.sh fills.

The guest kernel is Debian's `linux-image-<abi>-amd64` package unpacked with `dpkg -x` into
`<cache>/<package>/` (boot/vmlinuz-*, lib/modules/<release>/), kept outside the clone so it is
fetched once per machine.
"""

from __future__ import annotations

import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "scripts" / "setup-peers.sh"


def cache_dir() -> Path:
    """The cache directory, by the rule setup-peers.sh uses."""
    env = os.environ.get("VIRTIO_NET_REPLICA_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/virtio-net-replica")
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "virtio-net-replica"


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package: the bzImage and its module tree."""

    vmlinuz: Path
    modules: Path

    @property
    def release(self) -> str:
        return self.modules.name

    def vmlinux(self) -> Path:
        """The uncompressed ELF image beside the bzImage, extracted once.

        QEMU loads an ELF kernel through its PVH entry point, so the guest skips the
        bzImage's XZ decompression, which under TCG is most of a boot.
        """
        out = self.vmlinuz.with_name(self.vmlinuz.name.replace("vmlinuz", "vmlinux", 1))
        if not out.exists():
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            tmp.write_bytes(extract_vmlinux(self.vmlinuz.read_bytes()))
            os.replace(tmp, out)
        return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF inside an XZ-compressed bzImage, located by the boot protocol's setup header
    (setup_sects at 0x1f1, payload_offset and payload_length at 0x248)."""
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise ValueError("the bzImage's payload is not XZ (CONFIG_KERNEL_XZ)")
    elf = lzma.LZMADecompressor().decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        raise ValueError("the bzImage's payload is not an ELF image")
    return elf


def find_kernel(root: Path | None = None) -> Kernel:
    """The newest kernel package unpacked in the cache; FileNotFoundError names the fix."""
    root = root or cache_dir()
    candidates = sorted(root.glob("linux-image-*-amd64/.unpacked"))
    for marker in reversed(candidates):
        pkg = marker.parent
        images = sorted((pkg / "boot").glob("vmlinuz-*"))
        trees = sorted((pkg / "lib" / "modules").glob("*"))
        if images and trees:
            return Kernel(vmlinuz=images[-1], modules=trees[-1])
    raise FileNotFoundError(
        f"no unpacked linux-image-*-amd64 in {root}; run {SETUP_SCRIPT} (as root) to fetch it"
    )
