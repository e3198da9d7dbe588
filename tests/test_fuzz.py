"""The untrusted guest against the device's ring code, in process: a stateful fuzz
(vreplica.fuzz.machine's state machine with a CI budget), each ring check on its own, and the rule
that the device reaches guest RAM only through the bounds-checked accessor."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qemuproc.virtio as qvirtio
from common.virtio_abi import VIRTIO_CONFIG_S_NEEDS_RESET
from common.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from vreplica.fuzz.machine import DATA_BASE, PAGE, RAM_SIZE, VirtioNetFuzz, fuzz_settings
from vreplica.fuzz.packed import VirtioNetPackedFuzz

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
CI_EXAMPLES = 200
R, N, W, I = 0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
TX = 1


@pytest.fixture(autouse=True)
def quiet_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qvirtio, "error_report", lambda message: None)


@pytest.mark.timeout(60)
def test_hostile_guest_state_machine() -> None:
    """Arbitrary rings, indices, tables and kicks: the device never raises, never hangs,
    stays inside guest RAM, uses valid chains or reports virtio_error (see vreplica.fuzz)."""
    test = VirtioNetFuzz.TestCase("runTest")
    test.settings = fuzz_settings(CI_EXAMPLES)
    test.runTest()


@pytest.mark.timeout(60)
def test_hostile_guest_state_machine_on_packed_rings() -> None:
    """The same hostile guest on packed rings (any flags, wraps that slip, any event
    structures and ring addresses; see vreplica.fuzz.packed): the same properties, and a
    well-behaved driver's chains come back with their ids in the right wrap."""
    test = VirtioNetPackedFuzz.TestCase("runTest")
    test.settings = fuzz_settings(CI_EXAMPLES)
    test.runTest()


def guest(num: int = 8, **kw: bool) -> VirtioNetFuzz:
    g = VirtioNetFuzz()
    g.setup(num=num, mrg=kw.get("mrg", False), event_idx=kw.get("event_idx", True),
            indirect=kw.get("indirect", True), queues=1)
    return g


def chain(g: VirtioNetFuzz, descs: list[tuple[int, int, int, int]], which: int = TX,
          first: int = 0, linked: bool = False, kick: bool = True, copies: int = 1) -> None:
    g.publish_chain(which, first, descs, kick, copies, linked)


def indirect(g: VirtioNetFuzz, entries: list[tuple[int, int, int, int]], length: int = -1,
             where: int = -1, flags: int = 0) -> None:
    g.publish_indirect(TX, 0, entries, length, where, flags)


def inflight(g: VirtioNetFuzz) -> None:
    chain(g, [(DATA_BASE, 20, R, 0)], kick=False, copies=g.num)
    g.pop_and_hold(TX, g.num)
    chain(g, [(DATA_BASE, 20, R, 0)], kick=False)
    g.pop_and_hold(TX, 1)


def bad_head(g: VirtioNetFuzz) -> None:
    g.write_avail_entry(TX, 0, g.num)
    g.move_avail_idx(TX, 1)
    g.kick(TX)


def rx_readable(g: VirtioNetFuzz) -> None:
    chain(g, [OK], which=0)
    g.frame_from_backend(60)


def pfn(value: int) -> Callable[[VirtioNetFuzz], None]:
    return lambda g: g.write_queue_pfn(TX, value)


OK = (DATA_BASE, 64, R, 0)
CHECKS: dict[str, tuple[Callable[[VirtioNetFuzz], None], str]] = {
    "avail-idx": (lambda g: chain(g, [OK], copies=g.num + 1), "Guest moved used index from 0 to 9"),
    "head": (bad_head, "Guest says index 8 is available"),
    "next": (lambda g: chain(g, [(DATA_BASE, 64, N, 8)]), "Desc next is 8"),
    "loop": (lambda g: chain(g, [(DATA_BASE, 10, N, 1), (DATA_BASE, 10, N, 0)]),
             "Looped descriptor"),
    "inflight": (inflight, "Virtqueue size exceeded"),
    "indirect-len0": (lambda g: indirect(g, [OK], length=0),
                      "Invalid size for indirect buffer table"),
    "indirect-len": (lambda g: indirect(g, [OK], length=24),
                     "Invalid size for indirect buffer table"),
    "indirect-nested": (lambda g: indirect(g, [(DATA_BASE, 64, I, 0)]),
                        "Nested indirect descriptor: idx 0, "),
    "indirect-too-big": (lambda g: indirect(g, [OK], length=16 * 9),
                         "Indirect buffer length too big: 144"),
    "indirect-oob": (lambda g: indirect(g, [OK], where=RAM_SIZE - 8, length=32),
                     "Cannot map indirect buffer"),
    "indirect-loop": (lambda g: indirect(g, [(DATA_BASE, 10, N, 1), (DATA_BASE, 10, N, 0)]),
                      "Looped descriptor"),
    "indirect-next": (lambda g: indirect(g, [(DATA_BASE, 10, N, 2), OK]), "Desc next is 2"),
    "order": (lambda g: chain(g, [(DATA_BASE, 12, W, 0), OK], linked=True),
              "Incorrect order for descriptors"),
    "zero-len": (lambda g: chain(g, [(DATA_BASE, 0, R, 0)]),
                 "virtio: zero sized buffers are not allowed"),
    "oob-addr": (lambda g: chain(g, [(RAM_SIZE - 8, 64, R, 0)]),
                 "virtio: bogus descriptor or out of resources"),
    "oob-overflow": (lambda g: chain(g, [(2**64 - 8, 64, R, 0)]),
                     "virtio: bogus descriptor or out of resources"),
    "oob-huge": (lambda g: chain(g, [(DATA_BASE, 2**32 - 1, R, 0)]),
                 "virtio: bogus descriptor or out of resources"),
    "tx-writable": (lambda g: chain(g, [OK, (DATA_BASE + 100, 16, W, 0)], linked=True),
                    "Unexpected descriptor format for TX: out 1, int 1"),
    "tx-no-out": (lambda g: chain(g, [(DATA_BASE, 16, W, 0)]),
                  "virtio-net header not in first element"),
    "queue-pfn": (pfn(RAM_SIZE // PAGE + 1), "Cannot map desc"),
    "queue-pfn-used": (pfn(RAM_SIZE // PAGE - 1), "Cannot map used"),
    "rx-readable": (rx_readable, "virtio-net receive queue contains no in buffers"),
}


@pytest.fixture
def fresh() -> Iterator[Callable[..., VirtioNetFuzz]]:
    made: list[VirtioNetFuzz] = []

    def make(**kw: bool) -> VirtioNetFuzz:
        g = guest(**kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.teardown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("check", CHECKS)
def test_each_ring_check_ends_in_virtio_error(check: str,
                                              fresh: Callable[..., VirtioNetFuzz]) -> None:
    """One broken rule: the device reports it with QEMU's message, sets NEEDS_RESET, raises
    the config interrupt, ignores the guest until a reset, and works again after one."""
    g = fresh()
    commit, message = CHECKS[check]
    commit(g)
    n = g.n
    assert n is not None
    assert n.broken and n.errors[0].startswith(message), n.errors
    assert n.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert g.irqs.count(0) == 1  # the config vector, once
    used = n.vq[TX].used_idx
    g.kick(TX)
    chain(g, [OK])
    assert n.vq[TX].used_idx == used and len(n.errors) == 1  # kicks ignored while broken
    g.reset()
    g.valid_tx([(2, True, 50), (1, False, 30)])
    assert not n.broken and len(g.frames) == 2


@pytest.mark.timeout(30)
def test_valid_indirect_and_mergeable_chains_are_used(fresh: Callable[..., VirtioNetFuzz]) -> None:
    for kw in ({"indirect": True}, {"indirect": True, "mrg": True}, {"event_idx": False}):
        g = fresh(**kw)
        g.valid_tx([(3, True, 100), (2, True, 1), (1, False, 200)])
        g.valid_rx(cap=20, size=100, split=True, indirect=True)
        g.valid_rx(cap=0, size=60, split=False, indirect=False)
        assert g.n is not None and not g.n.broken and len(g.frames) == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("length", [6, 10])
def test_tx_chain_no_longer_than_the_header_is_sent_as_qemu_72_does(
        length: int, fresh: Callable[..., VirtioNetFuzz]) -> None:
    """QEMU 7.2's virtio_net_flush_tx reads the header only for a backend with a vnet header
    (tap); -netdev user has none, so a chain of at most the header is no ring error: the
    backend is handed what follows the header, nothing."""
    g = fresh()
    chain(g, [(DATA_BASE, length, R, 0)])
    n = g.n
    assert n is not None and not n.has_vnet_hdr
    assert not n.broken and n.errors == []
    assert g.frames == [b""]


def test_indirect_without_the_feature_is_refused(fresh: Callable[..., VirtioNetFuzz]) -> None:
    g = fresh(indirect=False)
    indirect(g, [OK, OK])
    assert g.n is not None and g.n.errors == ["Indirect descriptors not negotiated"]


SOURCE_RULES = [
    (r"\.ram\b", "guest RAM's raw view, or its segment's name"),
    (r"\b(dma|mem|memory)\._map\b", "GuestMemory's private mapping"),
]


def test_device_reaches_guest_ram_only_through_the_accessor() -> None:
    """No module of the device process holds or slices guest RAM itself: every view comes
    from address_space_map (or dma_memory_read/write), whose bounds check is the only door."""
    offenders = []
    for path in sorted((REPO / "qemuproc").glob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = re.sub(r'"[^"]*"|\'[^\']*\'', '""', line.split("#", 1)[0])  # no strings
            for pattern, what in SOURCE_RULES:
                if re.search(pattern, code) and "GuestMemory(" not in code:
                    offenders.append(f"{path.name}:{lineno}: {what}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    views = [p.name for p in (REPO / "qemuproc").glob("*.py") if "VringViews(" in p.read_text()]
    assert views == ["virtio.py"]
    text = (REPO / "qemuproc" / "virtio.py").read_text()
    assert "VringViews(ring," in text and "ring = dma.address_space_map(" in text  # split
    assert "PackedViews(vq.num, amap(" in text and "amap = dma.address_space_map" in text


@pytest.mark.timeout(30)
def test_an_empty_frame_stalls_tx_for_good(fresh: Callable[..., VirtioNetFuzz]) -> None:
    """A TX chain no longer than the virtio-net header is an empty frame; the backend takes 0
    bytes of it, and QEMU 7.2's net layer then keeps that backend off until its queue is
    flushed, which nothing does. A reset purges the parked element (virtio_net_reset's
    qemu_flush_or_purge_queued_packets: the flush meets the same 0), and every later frame
    waits too. (The state machine's valid_tx once expected the new rings to carry traffic.)"""
    g = fresh(num=4, event_idx=False, indirect=False)
    chain(g, [(45056, 1, 0, 0)] * 3)
    n = g.n
    assert n is not None and n.vqs[0].async_tx is not None and g.frames == [b""]
    assert g.backend.receive_disabled
    g.reset()
    assert n.vqs[0].async_tx is None and n.ncs[0].peer is not None
    assert not n.ncs[0].peer.incoming_queue.packets  # purged, its sender told
    g.valid_tx([(1, False, 1)])  # the machine's own check: nothing used, nothing sent
    assert n.vqs[0].async_tx is not None and not any(g.frames)  # the valid frame waits
