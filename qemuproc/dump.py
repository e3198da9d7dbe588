"""Stands for net/dump.c (``-object filter-dump``): every frame that crosses the NIC,
written to a pcap file (LINKTYPE_ETHERNET), with the time it crossed; a backend's virtio-net
header is left out (its checksum offload shows as the partial checksum the frame carries)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

from qemuproc.net import (
    NetClientState,
    NetFilter,
    qemu_get_using_vnet_hdr,
    qemu_get_vnet_hdr_len,
)

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


class FilterDump(NetFilter):
    def __init__(self, path: str | Path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - lives as long as the NIC
        self.f.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self.frames = 0

    def receive_iov(self, nc: NetClientState, sender: NetClientState,
                    iov: list[memoryview | bytes]) -> None:
        data = b"".join(iov)
        if qemu_get_using_vnet_hdr(nc):  # the frame behind the backend's vnet header
            data = data[qemu_get_vnet_hdr_len(nc):]
        t = time.time()
        sec = int(t)
        self.f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(data), len(data)))
        self.f.write(data)
        self.frames += 1

    def close(self) -> None:
        self.f.close()
