"""The initramfs archive format: cpio "newc" (SVR4 with no CRC), as the kernel's
usr/gen_init_cpio.c writes it and init/initramfs.c unpacks it."""

from __future__ import annotations

import stat
from typing import BinaryIO

TRAILER = "TRAILER!!!"


class CpioWriter:
    """Appends newc entries to a binary stream; close() writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._written = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded)
        self._pad()
        self._write(data)
        self._pad()
        self._ino += 1

    def _write(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._written += len(chunk)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._written % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry(TRAILER, 0, nlink=1)
        self._pad()
