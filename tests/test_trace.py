"""The trace of a real run: Chrome trace JSON that Perfetto opens, one packet's path through
the three processes in the order the real QEMU reports it, in an echo run its reply's path
back to the guest socket and the round trip as a whole, and their swimlane pictures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import msgpack
import pytest

from common.trace import VDEV_ADDR, elem_addr, elem_head, vq_addr, vq_index
from qemuproc.trace_events import QEMU_EVENTS, format_event
from vreplica.trace.tracefile import (
    ROLES,
    RX_FLOW_ID_BASE,
    find_replies,
    load_trace,
    merge_traces,
    packet_chain,
    packet_context,
    round_trip_chain,
)
from vreplica.trace.tracelog import read_qemu_log

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
PHASES = {"M", "X", "i", "s", "t", "f"}
TX_CHAIN = ["start_xmit", "vp_notify", "kvm_exit", "virtio_queue_notify", "virtqueue_pop",
            "net_slirp_receive", "sosendto", "virtqueue_fill", "virtqueue_flush",
            "virtio_notify", "vring_interrupt", "skb_xmit_done"]
RX_CHAIN = ["slirp_pollfds_poll", "sorecvfrom", "udp_output", "ip_output", "if_encap",
            "slirp_output", "qemu_send_packet", "qemu_sendv_packet_async",
            "qemu_net_queue_send_iov", "nc_sendv_compat", "virtio_net_receive", "virtqueue_pop",
            "virtqueue_fill", "virtqueue_flush", "virtio_notify", "kvm_vm_ioctl",
            "kvm_msi_set_irq", "kvm_inj_virq", "vring_interrupt", "skb_recv_done",
            "net_rx_action", "virtnet_poll",
            "virtnet_receive", "virtqueue_get_buf", "receive_buf", "netif_receive_skb", "ip_rcv",
            "udp_rcv", "recvfrom"]
RX_STEPS = ["sorecvfrom", "slirp_output", "qemu_net_queue_send_iov", "nc_sendv_compat",
            "virtio_net_receive", "virtqueue_pop", "virtqueue_fill", "virtqueue_flush",
            "virtio_notify", "kvm_vm_ioctl", "kvm_msi_set_irq", "kvm_inj_virq",
            "irq_handler_entry",
            "vring_interrupt", "skb_recv_done", "napi_poll", "virtqueue_get_buf", "receive_buf",
            "netif_receive_skb", "udp_rcv", "recvfrom"]


def vreplica(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def traced_run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "trace.json"
    proc = vreplica("run", "--packets", "5", "--pace-ms", "10", "--trace", str(out),
                    "--timeout", "30", *args)
    assert proc.returncode == 0, proc.stderr
    assert "delivered              5" in proc.stdout
    return out


def echo_run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "echo.json"
    proc = vreplica("run", "--mode", "echo", "--packets", "5", "--pace-ms", "10", "--trace",
                    str(out), "--timeout", "30", *args)
    assert proc.returncode == 0, proc.stderr
    assert "delivered              5" in proc.stdout
    return out


def in_order(names: list[str], wanted: list[str]) -> list[int]:
    """Positions of ``wanted`` as a subsequence of ``names`` (fails if one is missing)."""
    pos, at = [], 0
    for w in wanted:
        assert w in names[at:], f"{w} missing after {names[at - 1] if at else 'start'}: {names}"
        at = names.index(w, at) + 1
        pos.append(at - 1)
    return pos


@pytest.mark.timeout(60)
def test_trace_is_chrome_json_with_a_track_per_process_and_thread(tmp_path: Path) -> None:
    data = json.loads(traced_run(tmp_path).read_text())
    events = data["traceEvents"]
    assert {e["ph"] for e in events} <= PHASES
    for e in events:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] != "M":
            assert isinstance(e["ts"], float | int) and e["ts"] > 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
        if e["ph"] == "i":
            assert e["s"] == "t"
    procs = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert procs == {"guest (guestproc)", "kvm (kvmproc)", "qemu (qemuproc)"}
    threads = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"vCPU 0", "vcpu0", "CPU 0/KVM", "main loop"} <= threads
    assert "VM ioctls" in threads
    pop = next(e for e in events if e["ph"] == "i" and e["name"] == "virtqueue_pop")
    assert list(pop["args"]) == ["vq", "elem", "in_num", "out_num"]  # QEMU 7.2's, no more
    # the first pop is a control command at link-up (CTRL(q2)), as in the real run
    assert vq_index(pop["args"]["vq"]) == 2 and pop["args"]["vq"].startswith("0x")


VIRTIO_C = ("virtqueue_alloc_element", "virtqueue_pop", "virtqueue_fill", "virtqueue_flush",
            "virtio_queue_notify", "virtio_notify", "virtio_set_status")


@pytest.mark.timeout(60)
def test_virtio_events_carry_exactly_qemu_72s_arguments(tmp_path: Path) -> None:
    """hw/virtio/trace-events: each virtio.c event has QEMU 7.2's arguments and no more, its
    pointers one stable fake address per object (a queue's, a descriptor head's element)."""
    events = [e for e in json.loads(traced_run(tmp_path).read_text())["traceEvents"]
              if e["ph"] == "i"]
    seen = {e["name"] for e in events}
    assert set(VIRTIO_C) <= seen
    for e in events:
        if e["name"] in VIRTIO_C:
            assert tuple(e["args"]) == QEMU_EVENTS[e["name"]].args, e
    vdevs = {e["args"]["vdev"] for e in events if "vdev" in e.get("args", {})}
    assert vdevs == {hex(VDEV_ADDR)}
    by_vq = {e["args"]["vq"]: e["args"]["n"] for e in events if e["name"] == "virtio_queue_notify"}
    assert all(vq_index(vq) == n for vq, n in by_vq.items()) and 1 in by_vq.values()
    alloc = [e for e in events if e["name"] == "virtqueue_alloc_element"]
    pops = [e for e in events if e["name"] == "virtqueue_pop"]
    assert len(alloc) == len(pops) and {e["args"]["sz"] for e in alloc} == {56}
    assert [a["args"]["elem"] for a in alloc] == [p["args"]["elem"] for p in pops]
    filled = [e["args"]["elem"] for e in events if e["name"] == "virtqueue_fill"]
    assert set(filled) <= {p["args"]["elem"] for p in pops}


def not_qemus_format(lines: list[str], events: list, names: Iterable[str]) -> list[str]:
    """The lines of events named ``names`` whose arguments or text are not QEMU 7.2's."""
    wrong = []
    for line, e in zip(lines, events, strict=True):
        if e.name in names:
            text = line.split(":", 1)[1][len(e.name) + 1:]
            if tuple(e.args) != QEMU_EVENTS[e.name].args or format_event(e.name, e.args) != text:
                wrong.append(line)
    return wrong


@pytest.mark.timeout(60)
def test_trace_log_is_qemus_log_backend_format(tmp_path: Path) -> None:
    """--trace FILE.log: TID@SEC.USEC:name args for every process's trace points, in time
    order, each event under a QEMU name in QEMU 7.2's own format (what tools for QEMU logs
    read); the legacy notify register has no virtio_pci_notify_write_pio (modern only)."""
    out = tmp_path / "t.log"
    t0 = time.time()
    proc = vreplica("run", "--packets", "5", "--pace-ms", "10", "--trace", str(out),
                    "--ioeventfd", "off", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    events = read_qemu_log(out)
    assert len(events) == len(lines) > 100
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert t0 - 1 < events[0].ts / 1e9 < events[-1].ts / 1e9 < time.time() + 1
    names = {e.name for e in events}
    assert {"udp_sendmsg", "kvm_exit", "virtqueue_pop", "virtio_queue_notify"} <= names
    assert "virtio_pci_notify_write_pio" not in names
    assert len({e.tid for e in events}) >= 3
    assert not not_qemus_format(lines, events, VIRTIO_C)
    pop = next(line for line in lines if ":virtqueue_pop " in line)
    assert re.fullmatch(r"\d+@\d+\.\d{6}:virtqueue_pop vq 0x[0-9a-f]+ elem 0x[0-9a-f]+ "
                        r"in_num \d+ out_num \d+", pop)


@pytest.mark.timeout(60)
def test_every_event_under_a_qemu_name_has_qemus_arguments(tmp_path: Path) -> None:
    """Nothing under a QEMU 7.2 trace-event name (hw/virtio, accel/kvm, hw/intc, ...) in any
    process carries other arguments or prints otherwise than QEMU's."""
    out = tmp_path / "t.log"
    proc = vreplica("run", "--packets", "5", "--pace-ms", "10", "--trace", str(out),
                    "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    wrong = not_qemus_format(lines, read_qemu_log(out), QEMU_EVENTS)
    shown = sorted({re.sub(r"^\d+@[\d.]+:", "", w) for w in wrong})
    assert not wrong, "not QEMU 7.2's:\n" + "\n".join(shown[:30])


@pytest.mark.timeout(60)
def test_trace_events_switches_on_only_the_chosen_events(tmp_path: Path) -> None:
    """--trace-events, as QEMU's -trace enable=PATTERN: globs; no spans unless asked."""
    data = json.loads(traced_run(tmp_path, "--trace-events", "virtqueue_p*,sosendto")
                      .read_text())
    recorded = [e for e in data["traceEvents"] if e["ph"] in ("X", "i")]
    assert {e["name"] for e in recorded} == {"virtqueue_pop", "sosendto"}
    assert all(e["ph"] == "i" for e in recorded)
    assert sum(e["name"] == "sosendto" for e in recorded) == 5
    data = json.loads(traced_run(tmp_path, "--trace-events", "spans,sosendto").read_text())
    names = {e["name"] for e in data["traceEvents"] if e["ph"] == "i"}
    assert names == {"sosendto"}
    spans = {e["name"] for e in data["traceEvents"] if e["ph"] == "X"}
    assert {"virtqueue_pop", "virtio_net_flush_tx", "start_xmit"} <= spans


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", [[], ["--ioeventfd", "off"], ["--vectors", "0"]],
                         ids=["ioeventfd", "no-ioeventfd", "intx"])
def test_one_packet_crosses_the_three_processes_in_order(tmp_path: Path,
                                                         variant: list[str]) -> None:
    path = traced_run(tmp_path, *variant, "--pace-ms", "50")
    trace = load_trace(path)
    assert sorted(trace.packets) == [0, 1, 2, 3, 4]
    # paced, a datagram travels alone: its own kick and its own interrupt (on a loaded
    # machine a process may still be late by more than the pace: then two share them)
    whole = [seq for seq, p in trace.packets.items()
             if "kvm_exit" in [e.name for e in p.steps]
             and [e.name for e in p.steps][-3:] == ["vring_interrupt", "skb_xmit_done",
                                                    "virtqueue_get_buf"]]
    assert whole, {s: [e.name for e in p.steps] for s, p in trace.packets.items()}
    seq = whole[len(whole) // 2]
    chain = packet_chain(trace, seq)
    names = [c.name for c in chain]
    wanted = list(TX_CHAIN)
    if variant[:1] == ["--ioeventfd"]:
        wanted[3:3] = ["kvm_userspace_exit", "kvm_run_exit"]
        assert "ioeventfd_write" not in names
    else:
        wanted[3:3] = ["ioeventfd_write"]
    pos = in_order(names, wanted)
    steps = [chain[i] for i in pos]
    assert [s.ts for s in steps] == sorted(s.ts for s in steps)
    assert {s.process for s in steps} == set(ROLES)
    assert [s.process for s in steps[:3]] == ["guest", "guest", "kvm"]
    assert steps[-1].process == "guest"
    pids = {e.pid for e in trace.packets[seq].steps}
    assert len(pids) == 3 and pids == set(trace.roles)
    assert chain[0].name == "udp_sendmsg" and chain[0].process == "guest"
    sent = next(c for c in chain if c.name == "sosendto" and c.dur is None)
    assert sent.args["seq"] == seq
    pop = next(c for c in chain if c.name == "virtqueue_pop" and c.dur is None)
    add = next(c for c in chain if c.name == "virtqueue_add_split" and c.dur is None)
    assert elem_head(pop.args["elem"]) == (1, add.args["head"])
    # the guest's part ends with the reclaim; QEMU may still be finishing the bottom half that
    # sent it (re-enable notifications, recheck the ring) or its main loop iteration
    guest_tail = [c for c in chain if c.process == "guest"][-1]
    assert guest_tail.name in ("free_old_xmit_skbs", "virtqueue_get_buf")
    assert all(c.process == "qemu" for c in chain if c.ts > guest_tail.ts)
    depth = {c.name: c.depth for c in chain if c.dur is not None}
    assert depth["start_xmit"] > depth["udp_sendmsg"]
    assert depth["sosendto"] > depth["net_slirp_receive"] > depth["virtio_net_flush_tx"]

    flows = [e for e in json.loads(path.read_text())["traceEvents"]
             if e["ph"] in ("s", "t", "f") and e["id"] == seq + 1]
    assert flows[0]["ph"] == "s" and flows[-1]["ph"] == "f" and flows[-1]["bp"] == "e"
    assert {f["ph"] for f in flows[1:-1]} == {"t"}
    assert len({f["pid"] for f in flows}) == 3
    assert [f["args"]["step"] for f in flows] == [e.name for e in trace.packets[seq].steps]


def deschedule(path: Path, role_pid: int, tid: int, at_us: float, for_us: float) -> None:
    """Rewrite the trace as if thread ``tid`` had been descheduled ``for_us`` at ``at_us``: its
    later events move on by that much, and its spans running then last that much longer."""
    doc = json.loads(path.read_text())
    for e in doc["traceEvents"]:
        if e.get("pid") != role_pid or e.get("tid") != tid or "ts" not in e:
            continue
        if e["ts"] > at_us:
            e["ts"] += for_us
        elif e["ph"] == "X" and e["ts"] + e["dur"] > at_us:
            e["dur"] += for_us
    path.write_text(json.dumps(doc))


@pytest.mark.timeout(90)
def test_a_main_loop_descheduled_after_the_interrupt_keeps_its_functions_in_the_chain(
        tmp_path: Path) -> None:
    """QEMU's main loop loses its core right after the MSI ioctl and comes back 5 ms later,
    long after the guest reclaimed the buffer: the bottom half that sent the datagram is
    still part of the datagram's path, however late it returned."""
    path = traced_run(tmp_path)
    trace = load_trace(path)
    seq = sorted(trace.packets)[2]
    ioctl = next(e for e in trace.packets[seq].steps if e.name == "kvm_vm_ioctl")
    before = {c.name: c.depth for c in packet_chain(trace, seq) if c.dur is not None}
    assert before["sosendto"] > before["net_slirp_receive"] > before["virtio_net_flush_tx"]
    deschedule(path, ioctl.pid, ioctl.tid, ioctl.ts / 1000 + 0.001, 5000.0)
    late = load_trace(path)
    flush = next(e for e in late.events if e.name == "virtio_net_flush_tx" and e.is_span
                 and e.ts <= ioctl.ts <= e.end)
    assert flush.end - ioctl.ts > 5_000_000  # it returned after the pause
    after = {c.name: c.depth for c in packet_chain(late, seq) if c.dur is not None}
    assert after["sosendto"] > after["net_slirp_receive"] > after["virtio_net_flush_tx"]
    owners = {a.name for e in late.packets[seq].steps if e.role == "qemu"
              for a in e.ancestors() if a.parent is not None}  # all but the loop iteration
    assert {"virtio_net_tx_bh", "virtio_net_flush_tx", "aio_bh_poll"} <= owners <= set(after)


@pytest.mark.timeout(90)
def test_render_png_and_svg(tmp_path: Path) -> None:
    path = traced_run(tmp_path)
    png, svg = tmp_path / "p.png", tmp_path / "p.svg"
    for out in (png, svg):
        proc = vreplica("trace", "render", str(path), str(out), "--packet", "1")
        assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.parse(svg).getroot()
    texts = " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())
    for name in TX_CHAIN + ["kvm_pio", "kvm_vm_ioctl", "kvm_inj_virq", "main_loop_wait"]:
        assert name in texts, name
    window = tmp_path / "w.svg"
    trace = load_trace(path)
    chain = packet_chain(trace, 3)
    start, end = (chain[0].ts - trace.start / 1000, chain[-1].ts - trace.start / 1000)
    proc = vreplica("trace", "render", str(path), str(window), "--window", f"{start - 5:.1f}",
                    f"{end + 5:.1f}")
    assert proc.returncode == 0, proc.stderr
    assert "virtqueue_pop" in window.read_text()


@pytest.mark.timeout(30)
def test_render_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text('{"traceEvents": []}')
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    cases = [
        (str(tmp_path / "missing.json"), str(tmp_path / "x.svg"), "no such file"),
        (str(empty), str(tmp_path / "x.jpg"), ".svg or .png"),
        (str(empty), str(tmp_path / "x.svg"), "no packet"),
        (str(garbage), str(tmp_path / "x.png"), "not a JSON trace"),
        (str(empty), str(tmp_path / "nodir" / "x.png"), "no such directory"),
    ]
    for trace, out, why in cases:
        proc = vreplica("trace", "render", trace, out, "--packet", "7")
        assert proc.returncode == 2, (trace, out, proc.stderr)
        assert proc.stderr.count("\n") == 1 and why in proc.stderr, proc.stderr
        assert not Path(out).exists()


def piece(path: Path, role: str, pid: int, threads: dict[int, tuple[int, str]],
          records: list[tuple]) -> Path:
    path.write_bytes(msgpack.packb({
        "role": role, "pid": pid,
        "threads": {str(k): list(v) for k, v in threads.items()},
        "records": [[ns, ident, ph, name, args] for ns, ident, ph, name, args in records]}))
    return path


def synthetic_pieces(tmp_path: Path) -> list[Path]:
    """One datagram (seq 7, head 3, avail_idx 9) through made-up dumps, with decoys."""
    out, tx = {"vq": "output.0"}, {"vq": vq_addr(1)}
    dev = {"vdev": VDEV_ADDR}
    guest = [
        (1000, 1, "B", "udp_sendmsg", None), (1010, 1, "i", "udp_sendmsg", {"seq": 7}),
        (1020, 1, "B", "start_xmit", None), (1030, 1, "i", "start_xmit", out),
        (1040, 1, "i", "virtqueue_add_split", {**out, "head": 3, "avail_idx": 9}),
        (1050, 1, "B", "vp_notify", None),
        (1060, 1, "i", "vp_notify", {**out, "index": 1, "port": 49168}),
        (1200, 1, "E", "vp_notify", None), (1210, 1, "E", "start_xmit", None),
        (1220, 1, "E", "udp_sendmsg", None),
        (5000, 1, "i", "irq_handler_entry", {"irq": 40}), (5010, 1, "B", "vring_interrupt", None),
        (5020, 1, "i", "vring_interrupt", {**out, "irq": 40}),
        (5030, 1, "B", "skb_xmit_done", None), (5040, 1, "i", "skb_xmit_done", out),
        (5050, 1, "E", "skb_xmit_done", None), (5060, 1, "E", "vring_interrupt", None),
        (5100, 1, "B", "net_rx_action", None),
        (5110, 1, "i", "virtqueue_get_buf", {**out, "head": 3}),
        (5120, 1, "E", "net_rx_action", None),
    ]
    kvm = [
        (500, 11, "B", "kvm_arch_vcpu_ioctl_run", None),
        (1100, 11, "i", "kvm_exit", {"exit_reason": "IO_INSTRUCTION"}),
        (1110, 11, "B", "handle_exit", None),
        (1120, 11, "i", "kvm_pio", {"rw": 1, "port": 49168, "size": 2, "count": 1, "val": 1}),
        (1130, 11, "i", "ioeventfd_write", {}), (1140, 11, "E", "handle_exit", None),
        (1150, 11, "i", "kvm_entry", {}),
        (2000, 12, "i", "kvm_msi_set_irq", {"address": 0xFEE00000, "data": 39}),
        (2400, 12, "B", "kvm_vm_ioctl", None),
        (2410, 12, "i", "kvm_msi_set_irq", {"address": 0xFEE00000, "data": 40}),
        (2420, 12, "E", "kvm_vm_ioctl", None),
        (4100, 99, "i", "kvm_apic_accept_irq", {"apicid": 0, "dm": 0, "tm": 0, "vec": 236}),
        (4400, 11, "i", "kvm_inj_virq", {"irq": 236}),
        (4500, 11, "i", "kvm_inj_virq", {"irq": 40}),
    ]
    qemu = [
        (1000, 21, "B", "main_loop_wait", None),
        (1900, 21, "i", "virtqueue_pop", {**tx, "elem": elem_addr(1, 1), "in_num": 0,
                                          "out_num": 1}),
        (2000, 21, "B", "virtio_queue_notify_vq", None),
        (2010, 21, "i", "virtio_queue_notify", {**dev, "n": 1, **tx}),
        (2020, 21, "E", "virtio_queue_notify_vq", None),
        (2100, 21, "B", "aio_bh_poll", None), (2110, 21, "B", "virtqueue_pop", None),
        (2120, 21, "i", "virtqueue_pop", {**tx, "elem": elem_addr(1, 3), "in_num": 0,
                                          "out_num": 1}),
        (2130, 21, "E", "virtqueue_pop", None), (2200, 21, "B", "net_slirp_receive", None),
        (2210, 21, "B", "sosendto", None), (2220, 21, "i", "sosendto", {"seq": 7}),
        (2230, 21, "E", "sosendto", None), (2240, 21, "E", "net_slirp_receive", None),
        (2300, 21, "i", "virtqueue_fill", {**tx, "elem": elem_addr(1, 3), "len": 0, "idx": 0}),
        (2310, 21, "i", "virtqueue_flush", {**tx, "count": 1}),
        (2320, 21, "B", "virtio_notify", None), (2330, 21, "i", "virtio_notify", {**dev, **tx}),
        (2340, 21, "i", "kvm_vm_ioctl", {"type": 0x4020AEA5, "arg": 0x7FFD2C3A5E40}),
        (2350, 21, "E", "virtio_notify", None),
        (2400, 21, "E", "aio_bh_poll", None), (2500, 21, "E", "main_loop_wait", None),
    ]
    return [piece(tmp_path / "trace.guest.msgpack", "guest", 100, {1: (100, "MainThread")}, guest),
            piece(tmp_path / "trace.kvm.msgpack", "kvm", 200,
                  {11: (201, "vcpu0"), 12: (200, "MainThread")}, kvm),
            piece(tmp_path / "trace.qemu.msgpack", "qemu", 300, {21: (300, "MainThread")}, qemu)]


@pytest.mark.timeout(30)
def test_merge_pairs_spans_names_threads_and_follows_the_ids(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    merge_traces(synthetic_pieces(tmp_path), str(out))
    events = json.loads(out.read_text())["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["name"] == "thread_name"}
    assert threads[(100, 100)] == "vCPU 0" and threads[(300, 300)] == "main loop"
    assert threads[(200, 201)] == "vcpu0" and threads[(200, 200)] == "VM ioctls"
    assert "exited threads" in threads.values()
    run = next(e for e in events if e["name"] == "kvm_arch_vcpu_ioctl_run")
    assert run["ph"] == "X" and run["args"]["unfinished"] and run["dur"] == 4.0
    pop = next(e for e in events if e["name"] == "virtqueue_pop" and e["ph"] == "X")
    assert (pop["ts"], pop["dur"]) == (2.11, 0.02)

    trace = load_trace(out)
    steps = [e.name for e in trace.packets[7].steps]
    assert steps == ["start_xmit", "virtqueue_add_split", "vp_notify", "kvm_exit", "kvm_pio",
                     "ioeventfd_write", "virtio_queue_notify", "virtqueue_pop", "sosendto",
                     "virtqueue_fill", "virtqueue_flush", "virtio_notify", "kvm_vm_ioctl",
                     "kvm_msi_set_irq", "kvm_inj_virq", "irq_handler_entry", "vring_interrupt",
                     "skb_xmit_done", "virtqueue_get_buf"]
    msi = next(e for e in trace.packets[7].steps if e.name == "kvm_msi_set_irq")
    assert msi.args["data"] == 40
    inj = next(e for e in trace.packets[7].steps if e.name == "kvm_inj_virq")
    assert inj.args["irq"] == 40
    chain = packet_chain(trace, 7)
    assert chain[0].name == "udp_sendmsg" and chain[0].ts == 1.0 and chain[0].dur == 0.22
    assert chain[-1].name == "virtqueue_get_buf"
    names = [c.name for c in chain]
    assert "main_loop_wait" not in names and "kvm_arch_vcpu_ioctl_run" not in names
    assert "kvm_apic_accept_irq" not in names and names.count("virtqueue_pop") == 2
    depth = {(c.name, c.dur is None): c.depth for c in chain}
    assert depth[("sosendto", True)] == depth[("sosendto", False)] + 1
    assert depth[("sosendto", False)] == depth[("net_slirp_receive", False)] + 1 == 2
    assert {c.name for c in packet_context(trace, 7)} == {"main_loop_wait",
                                                          "kvm_arch_vcpu_ioctl_run"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", [[], ["--mrg-rxbuf", "on"]], ids=["small-bufs", "mrg-rxbuf"])
def test_reply_comes_back_through_the_three_processes_in_order(tmp_path: Path,
                                                               variant: list[str]) -> None:
    path = echo_run(tmp_path, *variant)
    trace = load_trace(path)
    assert sorted(trace.packets) == sorted(trace.replies) == [0, 1, 2, 3, 4]
    # paced and one at a time, each reply travels alone: its own interrupt through KVM
    whole = [seq for seq, p in trace.replies.items()
             if [e.name for e in p.steps if e.name in ("kvm_msi_set_irq", "kvm_inj_virq",
                                                       "vring_interrupt", "skb_recv_done")]
             == ["kvm_msi_set_irq", "kvm_inj_virq", "vring_interrupt", "skb_recv_done"]]
    assert len(whole) >= 3, {s: [e.name for e in p.steps] for s, p in trace.replies.items()}
    seq = whole[len(whole) // 2]
    reply = trace.replies[seq]
    assert [e.name for e in reply.steps] == RX_STEPS
    assert len({e.pid for e in reply.steps}) == 3

    chain = packet_chain(trace, seq, "rx")
    names = [c.name for c in chain]
    pos = in_order(names, RX_CHAIN)
    steps = [chain[i] for i in pos]
    assert [s.ts for s in steps] == sorted(s.ts for s in steps)
    assert [s.process for s in steps[:2]] == ["qemu", "qemu"]
    assert {s.process for s in steps} == set(ROLES) and steps[-1].process == "guest"
    assert chain[0].name == "slirp_pollfds_poll" and chain[-1].name == "recvfrom"
    assert {c.direction for c in chain} == {"rx"}
    points = {c.name: c for c in chain if c.dur is None}
    for name in ("sorecvfrom", "virtio_net_receive", "udp_rcv", "recvfrom"):
        assert points[name].args["seq"] == seq, name
    pop, fill = points["virtqueue_pop"], points["virtqueue_fill"]
    assert pop.args["vq"] == fill.args["vq"] and vq_index(pop.args["vq"]) == 0
    assert pop.args["in_num"] >= 1
    got = next(c for c in chain if c.name == "virtqueue_get_buf" and c.dur is None
               and c.args["vq"] == "input.0")
    assert pop.args["elem"] == fill.args["elem"]
    assert elem_head(pop.args["elem"]) == (0, got.args["head"]) and got.args["head"] == reply.head
    depth = {c.name: c.depth for c in chain if c.dur is not None}
    assert depth["virtio_net_receive"] > depth["nc_sendv_compat"] > depth["slirp_output"] \
        > depth["if_encap"] > depth["ip_output"] > depth["udp_output"] > depth["sorecvfrom"] \
        > depth["slirp_pollfds_poll"]
    assert depth["udp_rcv"] > depth["ip_rcv"] > depth["netif_receive_skb"] \
        > depth["receive_buf"] > depth["virtnet_receive"] > depth["virtnet_poll"] \
        > depth["net_rx_action"]
    assert "main_loop_wait" in {c.name for c in packet_context(trace, seq, "rx")}

    flows = [e for e in json.loads(path.read_text())["traceEvents"]
             if e["ph"] in ("s", "t", "f") and e["id"] == RX_FLOW_ID_BASE + seq + 1]
    assert flows[0]["ph"] == "s" and flows[-1]["ph"] == "f" and flows[-1]["bp"] == "e"
    assert {f["ph"] for f in flows[1:-1]} == {"t"} and {f["name"] for f in flows} == {"rx packet"}
    assert len({f["pid"] for f in flows}) == 3
    assert [f["args"]["step"] for f in flows] == RX_STEPS
    assert {f["args"]["seq"] for f in flows} == {seq}

    trip = round_trip_chain(trace, seq)
    dirs = [c.direction for c in trip]
    n_tx = dirs.count("tx")
    assert dirs == ["tx"] * n_tx + ["rx"] * (len(trip) - n_tx)
    tx, rx = trip[:n_tx], trip[n_tx:]
    assert tx[0].name == "udp_sendmsg" and tx[0].args == {} and rx[-1].name == "recvfrom"
    tx_names = [c.name for c in tx]
    done = in_order(tx_names, TX_CHAIN[:-2])[-1]  # ... virtio_notify
    # the sent skb is reclaimed by the TX interrupt's NAPI poll or, when the reply's
    # interrupt comes first, by virtnet_poll's virtnet_poll_cleantx (Linux 6.1 both)
    tail = tx_names[done:]
    assert "free_old_xmit_skbs" in tail, tx_names
    assert "virtnet_poll_tx" in tail or "virtnet_poll" in tail, tx_names
    in_order([c.name for c in rx], RX_CHAIN)
    # (virtnet_poll may appear: its virtnet_poll_cleantx can reclaim the sent skb)
    assert not {c.name for c in tx} & {"sorecvfrom", "skb_recv_done", "receive_buf",
                                       "udp_rcv", "recvfrom"}, [c.name for c in tx]
    # free_old_xmit_skbs may appear (virtnet_poll's virtnet_poll_cleantx reclaims TX), and so
    # may the TX NAPI poll when it shares the reply's softirq, after the reply's udp_rcv
    rx_names = [c.name for c in rx]
    assert not set(rx_names) & {"sosendto", "skb_xmit_done"}, rx_names
    late = rx_names.index("udp_rcv")
    assert all(i > late for i, c in enumerate(rx) if c.name == "virtnet_poll_tx"
               or (c.name == "napi_poll" and "output" in c.args["napi"])), rx_names
    assert [c.ts for c in tx] == sorted(c.ts for c in tx)
    assert [c.ts for c in rx] == sorted(c.ts for c in rx)
    sent = next(c for c in tx if c.name == "sosendto" and c.dur is None)
    read = next(c for c in rx if c.name == "sorecvfrom" and c.dur is None)
    assert sent.args["seq"] == read.args["seq"] == seq and read.ts > sent.ts
    assert rx[-1].ts > read.ts > tx[0].ts


@pytest.mark.timeout(60)
def test_render_round_trip_of_an_echo_run(tmp_path: Path) -> None:
    path = echo_run(tmp_path)
    svg = tmp_path / "rt.svg"
    proc = vreplica("trace", "render", str(path), str(svg), "--packet", "2")
    assert proc.returncode == 0, proc.stderr
    root = ET.parse(svg).getroot()
    texts = " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())
    assert "round trip seq 2" in texts
    for name in TX_CHAIN + RX_CHAIN:
        assert name in texts, name
    default = tmp_path / "default.png"
    proc = vreplica("trace", "render", str(path), str(default))
    assert proc.returncode == 0 and default.read_bytes()[:4] == b"\x89PNG", proc.stderr


def reply_pieces(tmp_path: Path) -> list[Path]:
    """One reply (seq 7, RX head 5) through made-up dumps, with decoys: the TX vector's
    MSI and injection, an earlier RX buffer (head 4) with another datagram (seq 6)."""
    rx, inp = {"vq": vq_addr(0)}, {"vq": "input.0"}
    qemu = [
        (6000, 21, "B", "main_loop_wait", None), (6100, 21, "B", "slirp_pollfds_poll", None),
        (6110, 21, "B", "sorecvfrom", None),
        (6120, 21, "i", "sorecvfrom", {"fd": 14, "sport": 5555, "len": 64, "seq": 7}),
        (6130, 21, "B", "udp_output", None), (6140, 21, "B", "ip_output", None),
        (6150, 21, "B", "if_encap", None), (6160, 21, "B", "slirp_output", None),
        (6170, 21, "i", "slirp_output", {"len": 106, "queue": 0}),
        (6180, 21, "B", "qemu_send_packet", None),
        (6190, 21, "B", "qemu_sendv_packet_async", None),
        (6200, 21, "B", "qemu_net_queue_send_iov", None),
        (6220, 21, "B", "nc_sendv_compat", None),
        (6240, 21, "B", "virtio_net_receive", None),
        (6250, 21, "i", "virtio_net_receive", {"len": 106, "seq": 7}),
        (6260, 21, "B", "virtqueue_pop", None),
        (6270, 21, "i", "virtqueue_pop", {**rx, "elem": elem_addr(0, 5), "in_num": 1,
                                          "out_num": 0}),
        (6280, 21, "E", "virtqueue_pop", None),
        (6290, 21, "i", "virtqueue_fill", {**rx, "elem": elem_addr(0, 5), "len": 116, "idx": 0}),
        (6300, 21, "i", "virtqueue_flush", {**rx, "count": 1}),
        (6310, 21, "B", "virtio_notify", None),
        (6320, 21, "i", "virtio_notify", {"vdev": VDEV_ADDR, **rx}),
        (6330, 21, "i", "kvm_vm_ioctl", {"type": 0x4020AEA5, "arg": 0x7FFD2C3A5E40}),
        (6340, 21, "E", "virtio_notify", None),
        (6350, 21, "E", "virtio_net_receive", None), (6360, 21, "E", "nc_sendv_compat", None),
        (6370, 21, "E", "qemu_net_queue_send_iov", None),
        (6380, 21, "E", "qemu_sendv_packet_async", None),
        (6390, 21, "E", "qemu_send_packet", None), (6400, 21, "E", "slirp_output", None),
        (6410, 21, "E", "if_encap", None), (6420, 21, "E", "ip_output", None),
        (6430, 21, "E", "udp_output", None), (6440, 21, "E", "sorecvfrom", None),
        (6450, 21, "E", "slirp_pollfds_poll", None), (6460, 21, "E", "main_loop_wait", None),
    ]
    kvm = [
        (6200, 13, "i", "kvm_msi_set_irq", {"address": 0xFEE00000, "data": 40}),
        (6600, 13, "B", "kvm_vm_ioctl", None),
        (6610, 13, "i", "kvm_msi_set_irq", {"address": 0xFEE00000, "data": 39}),
        (6630, 13, "E", "kvm_vm_ioctl", None),
        (6700, 11, "i", "kvm_inj_virq", {"irq": 40}),
        (6800, 11, "i", "kvm_inj_virq", {"irq": 39}),
    ]
    guest = [
        (6850, 1, "i", "irq_handler_entry", {"irq": 39}), (6860, 1, "B", "vring_interrupt", None),
        (6870, 1, "i", "vring_interrupt", {**inp, "irq": 39}),
        (6880, 1, "B", "skb_recv_done", None), (6890, 1, "i", "skb_recv_done", inp),
        (6900, 1, "E", "skb_recv_done", None), (6910, 1, "E", "vring_interrupt", None),
        (7000, 1, "B", "net_rx_action", None),
        (7010, 1, "i", "napi_poll", {"napi": "virtnet_poll_tx/output.0"}),
        (7020, 1, "i", "napi_poll", {"napi": "virtnet_poll/input.0"}),
        (7030, 1, "B", "virtnet_poll", None), (7040, 1, "B", "virtnet_receive", None),
        (7050, 1, "i", "virtqueue_get_buf", {**inp, "head": 4, "len": 116}),
        (7055, 1, "i", "receive_buf", {**inp, "len": 106}),
        (7058, 1, "i", "udp_rcv", {"seq": 6, "dport": 32768, "len": 64}),
        (7070, 1, "i", "virtqueue_get_buf", {**inp, "head": 5, "len": 116}),
        (7080, 1, "B", "receive_buf", None), (7090, 1, "i", "receive_buf", {**inp, "len": 106}),
        (7100, 1, "B", "netif_receive_skb", None),
        (7110, 1, "i", "netif_receive_skb", {"dev": "eth0", "len": 106}),
        (7120, 1, "B", "ip_rcv", None), (7130, 1, "B", "udp_rcv", None),
        (7140, 1, "i", "udp_rcv", {"seq": 7, "dport": 32768, "len": 64}),
        (7150, 1, "E", "udp_rcv", None), (7160, 1, "E", "ip_rcv", None),
        (7170, 1, "E", "netif_receive_skb", None), (7180, 1, "E", "receive_buf", None),
        (7190, 1, "E", "virtnet_receive", None), (7200, 1, "E", "virtnet_poll", None),
        (7210, 1, "E", "net_rx_action", None),
        (7300, 1, "i", "recvfrom", {"seq": 6, "len": 64}),
        (7310, 1, "i", "recvfrom", {"seq": 7, "len": 64}),
    ]
    return [piece(tmp_path / "trace.guest.msgpack", "guest", 100, {1: (100, "MainThread")}, guest),
            piece(tmp_path / "trace.kvm.msgpack", "kvm", 200,
                  {11: (201, "vcpu0"), 13: (200, "MainThread")}, kvm),
            piece(tmp_path / "trace.qemu.msgpack", "qemu", 300, {21: (300, "MainThread")}, qemu)]


@pytest.mark.timeout(30)
def test_merge_follows_a_reply_by_seq_and_rx_head(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    merged = merge_traces(reply_pieces(tmp_path), str(out))
    assert sorted(merged.replies) == [7] and not merged.packets
    trace = load_trace(out)
    reply = trace.replies[7]
    assert [e.name for e in reply.steps] == RX_STEPS
    assert [e.name for e in find_replies(trace)[7].steps] == RX_STEPS
    assert reply.head == 5
    args = {e.name: e.args for e in reply.steps}
    assert args["kvm_msi_set_irq"]["data"] == 39 and args["kvm_inj_virq"]["irq"] == 39
    assert args["kvm_vm_ioctl"]["type"] == 0x4020AEA5  # KVM_SIGNAL_MSI
    assert args["virtqueue_get_buf"]["head"] == 5 and args["udp_rcv"]["seq"] == 7
    assert args["napi_poll"]["napi"] == "virtnet_poll/input.0"
    assert args["recvfrom"]["seq"] == 7
    chain = packet_chain(trace, 7, "rx")
    names = [c.name for c in chain]
    assert names[0] == "slirp_pollfds_poll" and chain[0].ts == 6.1 and chain[0].dur == 0.35
    assert chain[-1].name == "recvfrom" and chain[-1].args["seq"] == 7
    assert "main_loop_wait" not in names and "kvm_apic_accept_irq" not in names
    assert {c.name for c in packet_context(trace, 7, "rx")} == {"main_loop_wait"}
    depth = {(c.name, c.dur is None): c.depth for c in chain}
    assert depth[("virtqueue_pop", True)] == depth[("virtio_net_receive", False)] + 2 == 12
    assert depth[("udp_rcv", False)] == depth[("net_rx_action", False)] + 6 == 6


@pytest.mark.timeout(30)
def test_trace_group_follows_its_events_and_push_records_when_switched_on() -> None:
    """A group is on while any member is, through set_state and switch; virtqueue_push, one
    step while its points are off, records virtqueue_fill and virtqueue_flush once they are
    switched on at run time (the monitor's trace-event), with the same used-ring result."""
    from ringmock import device_for, guest_memory, release_device

    from common import trace
    from common.vring_mock import MockSplitQueue
    from qemuproc.virtio import virtqueue_pop, virtqueue_push

    a, b = trace.trace_event("test_group_a"), trace.trace_event("test_group_b")
    group = trace.trace_group(a, b)
    assert not group.on
    trace.set_state("test_group_b", True)
    assert group.on
    saved = trace.states()
    trace.switch({"test_group_b": False})
    assert not group.on
    trace.switch(saved)
    assert group.on
    trace.set_state("test_group_*", False)
    assert not group.on

    with guest_memory() as mem:
        mock = MockSplitQueue(mem, 8)
        _, vq = device_for(mock)
        try:
            for switched in (False, True):
                trace.set_state("virtqueue_f*", switched)
                start = len(trace.records())
                head = mock.add_chain([b"x" * 20])
                elem = virtqueue_pop(vq)
                assert elem is not None and elem.index == head
                virtqueue_push(vq, elem, 7)
                names = [r[3] for r in trace.records()[start:]]
                assert names == (["virtqueue_fill", "virtqueue_flush"] if switched else [])
                assert mock.used_elem(mock.used_idx - 1) == (head, 7)
                assert vq.inuse == 0
        finally:
            trace.set_state("virtqueue_f*", False)
            release_device(vq)
            mock.release()
