"""QEMU's HMP views of the machine agree with what the other processes see: ``info pci`` /
``info qtree`` / ``info mtree`` against the run's options and KVM's ioeventfd table, ``x``
(the guest's identity mapping) against ``xp`` and the guest's own reads, ``info
trace-events`` in every process, and the monitor's history across ``attach`` sessions.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import pexpect
import pytest
from replica import Replica

pytestmark = pytest.mark.usefixtures("no_leftovers")

UP_ARROW = "\x1b[A"
MTREE_LINE = re.compile(r"^( *)([0-9a-f]{16})-([0-9a-f]{16}) \((prio (\d+), ([a-z/]+)|ioeventfd)\)"
                        r": (.*)$")


def hmp(r: Replica, line: str, role: str = "qemu") -> str:
    out = r.attach(role, "-c", line)
    assert out.returncode == 0, out.stderr
    return out.stdout


def mtree_regions(text: str) -> dict[str, list[tuple[int, int, int, str]]]:
    """address space -> [(depth, start, end, what)] from ``info mtree``'s lines."""
    spaces: dict[str, list[tuple[int, int, int, str]]] = {}
    current: list[tuple[int, int, int, str]] = []
    for line in text.splitlines():
        if line.startswith("address-space: "):
            current = spaces.setdefault(line.removeprefix("address-space: "), [])
        elif line.strip():
            m = MTREE_LINE.match(line)
            assert m, line
            kind = "ioeventfd" if m.group(4) == "ioeventfd" else m.group(6)
            current.append((len(m.group(1)) // 2, int(m.group(2), 16), int(m.group(3), 16),
                            f"{kind}: {m.group(7)}"))
    return spaces


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, vectors, ioeventfd", [
    (("--vectors", "3"), 3, True), (("--vectors", "0", "--ioeventfd", "off"), 0, False)])
def test_pci_qtree_and_mtree_describe_the_machine(replica: Callable[..., Replica],
                                                 args: tuple[str, ...], vectors: int,
                                                 ioeventfd: bool) -> None:
    r = replica("--hold", "--packets", "20", *args)
    r.wait_program_done()
    pci = r.q("qemu", "info pci")
    [dev] = pci[0]["devices"]
    assert (dev["slot"], dev["function"]) == (3, 0)
    assert dev["id"] == {"vendor": 0x1AF4, "device": 0x1000, "subsystem-vendor": 0x1AF4,
                         "subsystem": 1}
    assert dev["class_info"] == {"class": 0x0200, "desc": "Ethernet controller"}
    bars = {b["bar"]: b for b in dev["regions"]}
    assert bars[0]["type"] == "io" and bars[0]["size"] >= 20
    assert (1 in bars) == bool(vectors)
    text = hmp(r, "info pci")
    assert "  Bus  0, device   3, function 0:\n    Ethernet controller: PCI device 1af4:1000\n" \
        in text
    io = bars[0]["address"]
    assert f"      BAR0: I/O at 0x{io:04x} [0x{io + bars[0]['size'] - 1:04x}].\n" in text

    qtree = hmp(r, "info qtree")
    assert "bus: main-system-bus\n  type System\n" in qtree
    assert "      dev: virtio-net-pci, id \"\"\n" in qtree
    assert f"        vectors = {vectors} (0x{vectors:x})\n" in qtree
    assert f"        ioeventfd = {'true' if ioeventfd else 'false'}\n" in qtree
    assert "          dev: virtio-net-device, id \"\"\n" in qtree
    assert "            mac = \"52:54:00:12:34:56\"\n" in qtree
    assert f"        bar 0: i/o at 0x{io:x} [0x{io + bars[0]['size'] - 1:x}]\n" in qtree

    spaces = mtree_regions(hmp(r, "info mtree"))
    ram = r.q("qemu", "info status")["ram"]["size"]
    assert (2, 0, ram - 1, "ram: pc.ram") in spaces["memory"]
    assert (2, io, io + bars[0]["size"] - 1, "i/o: virtio-pci") in spaces["I/O"]
    msix = [e for e in spaces["memory"] if e[3].startswith("i/o: msix-table")]
    if vectors:
        base = bars[1]["address"]
        assert (2, base, base + 0xFFF, "i/o: virtio-net-pci-msix") in spaces["memory"]
        assert msix == [(3, base, base + 16 * vectors - 1, "i/o: msix-table")]
    else:
        assert not msix
    # the ioeventfds under the virtio BAR are the ones KVM holds on its PIO bus
    shown = {(start, end - start + 1, int(what.split("datamatch=")[1].split()[0]))
             for _, start, end, what in spaces["I/O"] if what.startswith("ioeventfd")}
    kvm = {(e["addr"], e["len"], e["datamatch"]) for e in r.q("kvm", "info ioeventfd")
           if e["bus"] == "pio"}
    assert shown == kvm
    assert bool(shown) == ioeventfd
    r.quit()


@pytest.mark.timeout(90)
def test_x_is_xp_through_the_identity_mapping(replica: Callable[..., Replica]) -> None:
    r = replica("--hold", "--packets", "10")
    r.wait_program_done()
    tx = r.q("qemu", "info virtio-queue-status 1")
    addr = tx["vring-desc"]
    x = r.q("qemu", f"x /8xg {addr:#x}")
    xp = r.q("qemu", f"xp /8xg {addr:#x}")
    assert x["mapping"] == "identity"
    assert x["values"] == xp["values"] == r.q("guest", f"x /8xg {addr:#x}")["values"]
    assert hmp(r, f"x /2xg {addr:#x}") == hmp(r, f"xp /2xg {addr:#x}")
    [row] = r.q("qemu", "help x")
    assert "identity" in row["help"]
    r.quit()


@pytest.mark.timeout(90)
def test_trace_events_in_every_process(replica: Callable[..., Replica]) -> None:
    r = replica("--hold", "--packets", "10")
    r.wait_program_done()
    for role, event in (("qemu", "virtqueue_pop"), ("kvm", "kvm_exit"),
                        ("guest", "vring_interrupt")):
        rows = {e["name"]: e["state"] for e in r.q(role, "info trace-events")}
        assert rows[event] == "disabled", role
        assert hmp(r, f"trace-event {event} on", role) == ""
        assert f"{event} : state 1\n" in hmp(r, f"info trace-events {event}", role)
        hmp(r, f"trace-event {event} off", role)
        assert r.q(role, f"info trace-events {event}") == [
            {"name": event, "state": "disabled", "vcpu": False}]
    r.quit()


@pytest.mark.timeout(90)
def test_history_outlasts_an_attach_session(replica: Callable[..., Replica]) -> None:
    """QEMU keeps a monitor's history in the monitor: the next session's up arrow finds it."""
    r = replica("--hold", "--packets", "10")
    r.wait_program_done()

    def session() -> pexpect.spawn:
        child = pexpect.spawn(sys.executable, ["-m", "vreplica.cli", "attach", "qemu", "--run",
                                               r.cfg.rid], env=r.env, encoding="utf-8",
                              timeout=15, dimensions=(40, 200))
        child.expect(r"\(qemu\) ")
        return child

    child = session()
    try:
        for line in ("info version", "info pci"):
            child.sendline(line)
            child.expect(r"\(qemu\) ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert r.q("qemu", "info history")[-2:] == ["info version", "info pci"]
    assert "0: 'info version'\n1: 'info pci'\n" in hmp(r, "info history")
    child = session()
    try:
        child.send(UP_ARROW + UP_ARROW + "\r")  # two back: info version
        child.expect(r"7\.2\.0virtio-net-replica")
        child.expect(r"\(qemu\) ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert r.q("qemu", "info history")[-1] == "info version"  # moved to the end
    assert r.q("kvm", "info history") == []  # each process's monitor has its own
    r.quit()

