"""A real QEMU 7.2 booting Debian's Linux 6.1 as a vhost-user front-end, and what its guest
reports on the serial console.

The QEMU line is the one a user types (docs/interop.md): guest RAM is a shared memfd so the
backend can map it, the NIC is virtio-net-pci on `-netdev vhost-user` with `vectors=0`
(INTx: with MSI-X, QEMU 7.2 under TCG aborts in vhost_net_start), and the kernel is the
ELF vmlinux, entered through PVH.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
GUEST_MAC = "52:54:00:12:34:56"

VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34


@dataclass(frozen=True)
class NicConfig:
    """virtio-net-pci's properties that choose the transport, the ring and RX buffers."""

    transport: str = "modern"  # legacy (disable-modern=on) | modern (disable-legacy=on)
    packed: bool = False
    mrg_rxbuf: bool = True

    @property
    def name(self) -> str:
        ring = "packed" if self.packed else "split"
        return f"{self.transport}-{ring}-mrg{'on' if self.mrg_rxbuf else 'off'}"

    def device(self) -> str:
        legacy = self.transport == "legacy"
        onoff = {True: "on", False: "off"}
        return ",".join([
            "virtio-net-pci", "netdev=n0", f"mac={GUEST_MAC}", "vectors=0", "romfile=",
            f"disable-legacy={onoff[not legacy]}", f"disable-modern={onoff[legacy]}",
            f"packed={onoff[self.packed]}", f"mrg_rxbuf={onoff[self.mrg_rxbuf]}",
        ])


def qemu_command(kernel: Path, initrd: Path, socket: Path, nic: NicConfig, console: Path,
                 guest_env: dict[str, str], mem_mb: int = 256) -> list[str]:
    """The QEMU line: TCG, one vCPU, no default devices, the console on `console`."""
    cmdline = " ".join(["console=ttyS0", "quiet", "panic=-1", "ipv6.disable=1",
                        *(f"{k}={v}" for k, v in guest_env.items())])
    return [
        QEMU, "-nodefaults", "-no-user-config", "-accel", "tcg", "-smp", "1",
        "-m", f"{mem_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-machine", "pc,memory-backend=mem",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-nographic", "-no-reboot", "-monitor", "none", "-serial", f"file:{console}",
        "-chardev", f"socket,id=c0,path={socket}",
        "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", nic.device(),
    ]


@dataclass
class GuestReport:
    """The counts /init prints (lines starting "VNR ")."""

    features: int | None = None
    ping: tuple[int, int] | None = None  # transmitted, received
    ping1472: tuple[int, int] | None = None
    barrier: tuple[int, int] | None = None
    udp_sent: int | None = None
    udp_echoed: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    done: bool = False
    failures: list[str] = field(default_factory=list)

    def has(self, bit: int) -> bool:
        return self.features is not None and bool(self.features >> bit & 1)


PING_TAGS = ("ping", "ping1472", "barrier")
PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) packets received")


def parse_console(text: str) -> GuestReport:
    """The guest's report from its console (a line may start with firmware output, which
    ends without a newline); sysfs `features` lists bit 0 first."""
    report = GuestReport()
    for line in text.splitlines():
        at = line.find("VNR ")
        if at < 0:
            continue
        body = line[at + 4:].strip()
        if body.startswith("features="):
            bits = body.split("=", 1)[1]
            report.features = sum(1 << i for i, c in enumerate(bits) if c == "1")
        elif (m := PING_RE.search(body)) and (tag := body.split(":", 1)[0]) in PING_TAGS:
            setattr(report, tag, (int(m.group(1)), int(m.group(2))))
        elif body.startswith("udpsend "):
            fields = dict(kv.split("=", 1) for kv in body.split()[1:])
            report.udp_sent = int(fields["sent"])
            report.udp_echoed = fields.get("echoed") == "1"
        elif body.startswith("stats "):
            report.stats = {k: int(v) for k, v in
                            (kv.split("=", 1) for kv in body.split()[1:])}
        elif body == "done":
            report.done = True
        elif "failed" in body or body == "no eth0":
            report.failures.append(body)
    return report
