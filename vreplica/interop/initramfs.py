"""The interop guest's initramfs: busybox-static, virtio-net's modules from Debian's kernel,
an /init script and udpsend, the project's own static datagram sender.

`python -m vreplica.interop.initramfs --out FILE` builds it from the cache setup-peers.sh
fills; the tests call build_initramfs().
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vreplica.interop.cache import Kernel, cache_dir, find_kernel
from vreplica.interop.cpio import CpioWriter

HERE = Path(__file__).resolve().parent
UDPSEND_SOURCE = HERE / "udpsend.c"
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = Path("/bin/busybox")

# virtio-net's module chain in dependency order (what modprobe would load from modules.dep).
MODULES = (
    "kernel/drivers/virtio/virtio",
    "kernel/drivers/virtio/virtio_ring",
    "kernel/drivers/virtio/virtio_pci_legacy_dev",
    "kernel/drivers/virtio/virtio_pci_modern_dev",
    "kernel/drivers/virtio/virtio_pci",
    "kernel/net/core/failover",
    "kernel/drivers/net/net_failover",
    "kernel/drivers/net/virtio_net",
)


def module_bytes(tree: Path, stem: str) -> bytes:
    """One module's ELF image, decompressed if the package ships it as .ko.xz or .ko.zst."""
    plain = tree / f"{stem}.ko"
    if plain.exists():
        return plain.read_bytes()
    xz = tree / f"{stem}.ko.xz"
    if xz.exists():
        return lzma.decompress(xz.read_bytes())
    zst = tree / f"{stem}.ko.zst"
    if zst.exists():
        if shutil.which("zstd") is None:
            raise FileNotFoundError(f"{zst} needs zstd to decompress (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc", str(zst)], check=True,
                              capture_output=True).stdout
    raise FileNotFoundError(f"module {stem} not in {tree}")


def build_udpsend(cache: Path | None = None) -> Path:
    """udpsend.c compiled with gcc -static, cached by the source's hash."""
    cache = cache or cache_dir()
    source = UDPSEND_SOURCE.read_bytes()
    out = cache / f"udpsend-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".udpsend.")
    os.close(fd)
    try:
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", tmp,
                        str(UDPSEND_SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"gcc -static udpsend.c failed: {exc.stderr.strip()}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_initramfs(out: Path, kernel: Kernel | None = None, busybox: Path = BUSYBOX,
                    udpsend: Path | None = None) -> Path:
    """Write the initramfs (cpio newc) to `out` and return it."""
    kernel = kernel or find_kernel()
    udpsend = udpsend or build_udpsend()
    names = [stem.rsplit("/", 1)[1] for stem in MODULES]
    with open(out, "wb") as f:
        cpio = CpioWriter(f)
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
            cpio.directory(d)
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, perm=0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), perm=0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("bin/udpsend", udpsend.read_bytes(), perm=0o755)
        cpio.file("init", INIT_SCRIPT.read_bytes(), perm=0o755)
        for stem, name in zip(MODULES, names, strict=True):
            cpio.file(f"lib/modules/{name}.ko", module_bytes(kernel.modules, stem))
        cpio.file("lib/modules/load", ("\n".join(names) + "\n").encode())
        cpio.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vreplica.interop.initramfs",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the initramfs file to write")
    args = parser.parse_args(argv)
    try:
        kernel = find_kernel()
    except FileNotFoundError as exc:
        print(f"initramfs: {exc}", file=sys.stderr)
        return 2
    build_initramfs(args.out, kernel)
    print(f"{args.out} (for {kernel.vmlinuz})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
