"""``vreplica trace compare REAL.log REPLICA.json|.log``: a real QEMU's trace log beside a
replica trace, phase by phase and packet by packet.

Not part of the replicated system: a tool that reads two traces of the same scenario (one
warm-up datagram, datagrams spaced apart, a burst), one from QEMU 7.2 (``-trace
virtio_*,virtqueue_*,... -D FILE``), one from the replica (``--trace FILE.json`` or
``FILE.log``), and lines up what the device did for each frame.

Both are read the same way, from the log alone:

* the run starts at the last ``virtio_set_status`` with DRIVER_OK before the first frame;
* queues are told apart by ``virtio_queue_notify``'s ``n`` and ``vq``: ``n`` even is RX,
  odd TX, and the highest ``n`` is the control queue when it is even (one queue pair: 2);
* a frame is one ``virtqueue_pop`` on a TX queue: with the TX kick that led to it and what
  the device did up to the next frame;
* phases come from the gaps between frames: the first cluster of frames is the warm-up, a
  run of lone frames is a spaced phase, a later cluster a burst.

Events only one side can have are mapped through ``ONE_SIDED`` and nothing else: the
interrupt that follows a ``virtio_notify`` (TCG logs QEMU's own APIC, IOAPIC or PIC model
delivering it; under KVM the kernel's tracepoint shows the injection) and the elements
(QEMU's heap addresses; the replica's addresses stand for descriptor heads).

Exit status 0 when the probe (DRIVER_OK to the first frame) has as many pops on each queue
(the control queue's requests), the warm-up's and the spaced phases' frames have the same
event sequences, every phase the same number of frames, and a burst (whose kicks and
interrupts depend on timing) is well formed on both sides with kicks and interrupts
between one and one per frame; 1 otherwise; 2 for unreadable input.

One difference is called a race instead, and only where the replica's JSON trace proves it:
a frame that lacks nothing but the real trace's kick (and maybe its TX interrupt), popped in
the same run of QEMU's TX handler (``TX_PASSES``) as the frame before it. The driver queued it
while that run still had notifications off, so its avail_event was not due a kick; completed
in that run before the driver took the previous frame's interrupt, its used_event asked for
none of its own. The real system has the same race wherever the guest answers faster than
TCG's 10 ms.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.trace import elem_head, vq_index
from vreplica.trace.tracelog import LogEvent, read_qemu_log

VIRTIO_CONFIG_S_DRIVER_OK = 4
DEVICE_EVENTS = ("virtio_queue_notify", "virtqueue_pop", "virtqueue_fill", "virtqueue_flush",
                 "virtio_notify")
KINDS = {"virtio_queue_notify": "kick", "virtqueue_pop": "pop", "virtqueue_fill": "fill",
         "virtqueue_flush": "flush", "virtio_notify": "notify"}


@dataclass(frozen=True)
class OneSided:
    """An event only one of the two kinds of trace has, and what it is read as."""

    side: str
    stands_for: str
    same_thread: bool = False
    """It shows the interrupt only right after the ``virtio_notify`` on the same thread."""


ONE_SIDED: dict[str, OneSided] = {
    "apic_deliver_irq": OneSided("TCG", "irq: QEMU's APIC model delivers the MSI", True),
    "memory_region_ops_write": OneSided("TCG", "irq: the MSI write (mr 'apic-msi')", True),
    "ioapic_set_irq": OneSided("TCG", "irq (INTx): QEMU's IOAPIC pin rises", True),
    "pic_set_irq": OneSided("TCG", "irq (INTx): QEMU's PIC line rises", True),
    "kvm_msi_set_irq": OneSided("KVM", "irq: KVM injects the MSI into the local APIC"),
    "kvm_set_irq": OneSided("KVM", "irq (INTx): KVM raises the GSI"),
    "virtqueue_pop.elem": OneSided("both", "element: QEMU's heap address | the replica's "
                                           "address of the descriptor head (e0, e1: order "
                                           "of first use in the frame)"),
    "virtio_set_status": OneSided("both", "only where the run starts (DRIVER_OK); the values "
                                          "before it differ (TCG's firmware, the replica's "
                                          "FEATURES_OK)"),
    "virtqueue_alloc_element": OneSided("both", "not compared: one before every pop"),
}
"""The one explicit table of events that only one side has, or that are not compared."""

CLUSTER_FRACTION = 0.2
"""Frames closer than this fraction of the longest gap between frames are one cluster. The
scenario's pauses between phases are 1-1.3 s and its spacing 300 ms; a loaded machine
stretches the replica's gaps inside a cluster (at a load average of 18 on two cores: the
warm-up's datagram 60-80 ms after the ARP reply, one stall of 173 ms inside a burst)."""
SPACING_TOLERANCE = 1.0
"""Lone frames whose gap is more than this fraction longer than the phase's spacing start
another phase: a pause between phases is over three times the spacing, where load makes the
replica's spaced gaps 300-470 ms."""
WARM, SPACED, BURST = "warm-up", "spaced", "burst"
TX_PASSES = ("virtio_net_tx_bh", "virtio_net_tx_timer")
"""One run of QEMU's TX handler: flush, re-enable notifications, flush again (a replica
trace's spans; QEMU's log has no such event)."""


class CompareError(Exception):
    """A file that cannot be read as a trace."""


@dataclass
class Tok:
    """One thing the device did, as compared: ``kind`` (kick, pop, fill, flush, notify, irq)
    on ``queue`` (RX, TX, CTRL), with the element and what else the event said."""

    ts: int
    tid: int
    kind: str
    queue: str
    elem: str | None = None
    detail: str = ""
    source: str = ""

    def key(self, alias: dict[str, str]) -> tuple[str, str, str]:
        return self.kind, self.queue, alias.get(self.elem, "") if self.elem else ""

    def text(self, alias: dict[str, str]) -> str:
        e = f" {alias[self.elem]}" if self.elem and self.elem in alias else ""
        d = f" {self.detail}" if self.detail else ""
        return f"{self.kind} {self.queue}{e}{d}"


@dataclass
class Frame:
    pop: Tok
    toks: list[Tok] = field(default_factory=list)

    def aliases(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for t in self.toks:
            if t.elem and t.elem not in out:
                out[t.elem] = f"e{len(out)}"
        return out

    def keys(self) -> list[tuple[str, str, str]]:
        a = self.aliases()
        return [t.key(a) for t in self.toks]

    def count(self, kind: str, queue: str = "TX") -> int:
        return sum(1 for t in self.toks if t.kind == kind and t.queue == queue)


@dataclass
class Phase:
    name: str
    frames: list[Frame]


@dataclass(frozen=True)
class Pass:
    """One ``TX_PASSES`` span: its thread, start, end and name."""

    tid: int
    ts: int
    end: int
    name: str


@dataclass
class Side:
    """One trace, read for the comparison; ``passes`` None where the trace has no spans."""

    label: str
    queues: dict[str, str]
    probe: list[Tok]
    phases: list[Phase]
    events: int
    passes: list[Pass] | None = None

    def pass_of(self, tok: Tok) -> Pass | None:
        """The TX handler pass ``tok`` happened in, if the trace shows one."""
        for p in self.passes or ():
            if p.tid == tok.tid and p.ts <= tok.ts <= p.end:
                return p
        return None


# -- reading ------------------------------------------------------------------------------------


def load_events(path: str | Path) -> tuple[list[LogEvent], list[Pass] | None]:
    """A QEMU log (real or the replica's ``.log``) or a replica Chrome JSON trace, as log
    events (trace points only) in time order; with a JSON trace, also its ``TX_PASSES``."""
    p = Path(path)
    if not p.is_file():
        raise CompareError(f"no such file: {path}")
    passes: list[Pass] | None = None
    if p.suffix == ".json":
        from vreplica.trace.tracefile import TraceError, load_trace

        try:
            trace = load_trace(p)
        except TraceError as e:
            raise CompareError(str(e)) from None
        events = [LogEvent(e.ts, e.tid, e.name, e.args) for e in trace.events if not e.is_span]
        passes = [Pass(e.tid, e.ts, e.end, e.name) for e in trace.events
                  if e.is_span and e.name in TX_PASSES]
    else:
        try:
            events = read_qemu_log(p)
        except (OSError, UnicodeDecodeError) as e:
            raise CompareError(f"{path}: {e}") from None
    if not any(e.name == "virtqueue_pop" for e in events):
        raise CompareError(f"{path}: no virtqueue_pop events (is it a trace of the device?)")
    return sorted(events, key=lambda e: e.ts), passes


def queue_names(events: Iterable[LogEvent]) -> dict[str, str]:
    """vq address -> RX(qN) / TX(qN) / CTRL(qN), from virtio_queue_notify's n and vq (and,
    for a replica address never kicked, the index it stands for)."""
    index: dict[str, int] = {}
    for e in events:
        if e.name == "virtio_queue_notify" and "vq" in e.args and "n" in e.args:
            index.setdefault(str(e.args["vq"]), int(e.args["n"]))
        elif e.name in DEVICE_EVENTS and "vq" in e.args:
            n = vq_index(e.args["vq"])
            if n is not None:
                index.setdefault(str(e.args["vq"]), n)
    top = max(index.values(), default=0)
    ctrl = top if top >= 2 and top % 2 == 0 else None
    return {vq: (f"CTRL(q{n})" if n == ctrl else f"{'TX' if n % 2 else 'RX'}(q{n})")
            for vq, n in index.items()}


def _start(events: list[LogEvent], first_tx_pop: int) -> int:
    start = 0
    for e in events:
        if e.ts > first_tx_pop:
            break
        if e.name == "virtio_set_status" and int(e.args.get("val", 0)) & VIRTIO_CONFIG_S_DRIVER_OK:
            start = e.ts
    return start


def _is_interrupt(e: LogEvent) -> bool:
    if e.name not in ONE_SIDED or ONE_SIDED[e.name].side not in ("TCG", "KVM"):
        return False
    if e.name == "memory_region_ops_write":
        return e.args.get("name") == "apic-msi"
    return int(e.args.get("level", 1)) != 0


LINE_EVENTS = {"pic_set_irq": ("master", "irq"), "ioapic_set_irq": ("vector",)}
"""TCG's INTx events, and the arguments that name the line: other devices (the serial port)
raise other lines on the same thread."""


def _line(e: LogEvent) -> tuple[Any, ...] | None:
    keys = LINE_EVENTS.get(e.name)
    return None if keys is None else (e.name, *(e.args.get(k) for k in keys))


def device_lines(events: list[LogEvent]) -> set[tuple[Any, ...]]:
    """The INTx lines of the device: for each kind of line event, the line most often raised
    right after a ``virtio_notify`` on the same thread."""
    after: dict[tuple[Any, ...], int] = {}
    last: dict[int, str] = {}
    for e in events:
        line = _line(e)
        if line is not None and _is_interrupt(e) and last.get(e.tid) == "virtio_notify":
            after[line] = after.get(line, 0) + 1
        last[e.tid] = e.name
    best: dict[str, tuple[Any, ...]] = {}
    for line, n in after.items():
        if n > after.get(best.get(line[0], ()), 0):
            best[line[0]] = line
    return set(best.values())


def tokens(events: list[LogEvent], queues: dict[str, str]) -> list[Tok]:
    """The device's events as tokens, each interrupt (``ONE_SIDED``; on the device's own line,
    ``device_lines``) as an ``irq`` of the queue whose ``virtio_notify`` it follows."""
    out: list[Tok] = []
    pending: Tok | None = None
    last_on: dict[int, Any] = {}
    lines = device_lines(events)
    for e in events:
        if e.name in DEVICE_EVENTS:
            q = queues.get(str(e.args.get("vq")), f"?{e.args.get('vq')}")
            kind = KINDS[e.name]
            queue = q.split("(")[0]
            detail = ""
            if kind == "fill":
                detail = f"len {e.args.get('len')}"
            elif kind == "flush":
                detail = f"count {e.args.get('count')}"
            tok = Tok(e.ts, e.tid, kind, queue, str(e.args["elem"]) if "elem" in e.args else None,
                      detail, f"{e.name} {_args(e.args)}")
            out.append(tok)
            last_on[e.tid] = tok
            if kind == "notify":
                pending = tok
        elif _is_interrupt(e) and (_line(e) is None or _line(e) in lines):
            rule = ONE_SIDED[e.name]
            if pending is not None and (not rule.same_thread or last_on.get(e.tid) is pending):
                out.append(Tok(e.ts, e.tid, "irq", pending.queue, None, "",
                               f"{e.name} {_args(e.args)}"))
                pending = None
            last_on[e.tid] = e
    return out


def _args(args: dict[str, Any]) -> str:
    shown = dict(args)
    found = elem_head(shown.get("elem"))
    if found is not None:
        shown["elem"] = f"{shown['elem']} (head {found[1]})"
    return " ".join(f"{k} {v}" for k, v in shown.items())


def frames_of(toks: list[Tok]) -> tuple[list[Tok], list[Frame]]:
    """(the probe's tokens, the frames): a TX pop opens a frame; a TX kick goes with the next
    TX pop if nothing but TX kicks comes between (else it was answered by no pop: the kicks
    QEMU makes itself when it starts the ioeventfds); the rest with the frame before them."""
    pops = [i for i, t in enumerate(toks) if t.kind == "pop" and t.queue == "TX"]
    probe: list[Tok] = []
    frames: list[Frame] = [Frame(toks[i]) for i in pops]
    owner = -1  # frame index of the latest TX pop
    nxt = 0
    for i, t in enumerate(toks):
        while nxt < len(pops) and pops[nxt] < i:
            nxt += 1
        if nxt < len(pops) and pops[nxt] == i:
            owner = nxt
        target = owner
        if t.kind == "kick" and t.queue == "TX" and nxt < len(pops) and pops[nxt] > i \
                and all(u.kind == "kick" and u.queue == "TX" for u in toks[i + 1:pops[nxt]]):
            target = nxt
        (probe if target < 0 else frames[target].toks).append(t)
    return probe, frames


def phases_of(frames: list[Frame]) -> list[Phase]:
    """Clusters of frames by the gaps between them (``CLUSTER_FRACTION`` of the longest); the
    first cluster is the warm-up, each later cluster of several frames a burst, each run of
    lone frames with like gaps (``SPACING_TOLERANCE``) a spaced phase."""
    if not frames:
        return []
    gaps = [b.pop.ts - a.pop.ts for a, b in zip(frames, frames[1:], strict=False)]
    cut = max(gaps, default=0) * CLUSTER_FRACTION
    clusters: list[list[Frame]] = [[frames[0]]]
    for f, g in zip(frames[1:], gaps, strict=False):
        if g > cut:
            clusters.append([f])
        else:
            clusters[-1].append(f)
    phases = [Phase(WARM, clusters[0])]
    spacing: float | None = None
    for prev, c in zip(clusters, clusters[1:], strict=False):
        gap = c[0].pop.ts - prev[-1].pop.ts
        if len(c) > 1:
            phases.append(Phase(BURST, c))
            spacing = None
            continue
        last = phases[-1]
        if last.name == SPACED and (spacing is None
                                    or abs(gap - spacing) <= SPACING_TOLERANCE * spacing):
            last.frames += c
            spacing = gap if spacing is None else spacing
        else:
            phases.append(Phase(SPACED, list(c)))
            spacing = None
    return phases


def read_side(path: str | Path) -> Side:
    events, passes = load_events(path)
    queues = queue_names(events)
    first = next((e.ts for e in events if e.name == "virtqueue_pop"
                  and queues.get(str(e.args.get("vq")), "").startswith("TX")), None)
    if first is None:
        raise CompareError(f"{path}: no frame: no virtqueue_pop on a TX queue")
    start = _start(events, first)
    run = [e for e in events if e.ts >= start]
    probe, frames = frames_of(tokens(run, queues))
    return Side(str(path), queues, probe, phases_of(frames), len(events), passes)


# -- comparing ----------------------------------------------------------------------------------


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    races: list[str] = field(default_factory=list)
    """Frames whose only difference is a kick the replica's trace shows was not due."""

    def say(self, text: str = "") -> None:
        self.lines.append(text)

    def differ(self, text: str) -> None:
        self.problems.append(text)
        self.lines.append(f"  !! {text}")


def _counts(frames: list[Frame]) -> dict[str, int]:
    return {"frames": len(frames), "kicks": sum(f.count("kick") for f in frames),
            "pops": sum(f.count("pop") for f in frames),
            "notifies": sum(f.count("notify") for f in frames),
            "irqs": sum(f.count("irq") for f in frames),
            "rx pops": sum(f.count("pop", "RX") for f in frames),
            "ctrl pops": sum(f.count("pop", "CTRL") for f in frames)}


def _count_table(r: Report, real: list[Frame], rep: list[Frame], exact: bool) -> None:
    a, b = _counts(real), _counts(rep)
    r.say(f"  {'':11} {'real':>8} {'replica':>8}   per frame: real  replica")
    for k in a:
        per = "" if k == "frames" else \
            f"{a[k] / max(1, a['frames']):>16.2f} {b[k] / max(1, b['frames']):>8.2f}"
        mark = "  " if a[k] == b[k] or (not exact and k != "frames") else "!="
        r.say(f"  {mark}{k:9} {a[k]:>8} {b[k]:>8} {per}")


def _side_by_side(r: Report, fa: Frame, fb: Frame) -> bool:
    aa, ab = fa.aliases(), fb.aliases()
    ka, kb = fa.keys(), fb.keys()
    same = ka == kb
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes():
        left = [fa.toks[i].text(aa) for i in range(i1, i2)]
        right = [fb.toks[j].text(ab) for j in range(j1, j2)]
        mark = {"equal": " ", "replace": "!", "delete": "<", "insert": ">"}[op]
        for k in range(max(len(left), len(right))):
            lt = left[k] if k < len(left) else ""
            rt = right[k] if k < len(right) else ""
            if op == "equal" and lt != rt:
                mark = "~"  # same event, other details (a length)
            r.say(f"   {mark} {lt:34} {rt}")
            mark = {"equal": " ", "replace": "!", "delete": "<", "insert": ">"}[op]
    return same


def _compact(frames: list[Frame]) -> str:
    letters = {("kick", "TX"): "K", ("pop", "TX"): "P", ("fill", "TX"): "f",
               ("notify", "TX"): "N", ("irq", "TX"): "I"}
    return "".join(letters.get((t.kind, t.queue), "") for f in frames for t in f.toks)


def _burst_ok(r: Report, who: str, frames: list[Frame]) -> None:
    c = _counts(frames)
    n = c["frames"]
    for f in frames:
        if f.count("pop") != 1 or f.count("fill") != 1 or f.count("flush") != 1:
            r.differ(f"{who}: a burst frame is not one pop, fill and flush: "
                     f"{[t.text(f.aliases()) for t in f.toks]}")
            return
    if not 1 <= c["kicks"] <= n:
        r.differ(f"{who}: {c['kicks']} TX kicks for a burst of {n} frames")
    if not 1 <= c["notifies"] <= n:
        r.differ(f"{who}: {c['notifies']} TX notifies for a burst of {n} frames")


def compare(real: Side, rep: Side) -> Report:
    r = Report()
    r.say(f"real     {real.label}: {real.events} events; queues "
          + ", ".join(f"{q} vq {a}" for a, q in sorted(real.queues.items(), key=lambda x: x[1])))
    r.say(f"replica  {rep.label}: {rep.events} events; queues "
          + ", ".join(f"{q} vq {a}" for a, q in sorted(rep.queues.items(), key=lambda x: x[1])))
    r.say("one-sided events, mapped or left out (the only such table):")
    for name, m in ONE_SIDED.items():
        r.say(f"  {name:24} {m.side:5} {m.stands_for}")
    r.say()
    r.say("probe: DRIVER_OK to the first frame, real | replica (the pops are in the verdict: "
          "the driver's requests; kicks and interrupts there depend on timing)")
    for q in ("RX", "TX", "CTRL"):
        line = []
        for kind in ("kick", "pop", "notify", "irq"):
            a = sum(1 for t in real.probe if t.kind == kind and t.queue == q)
            b = sum(1 for t in rep.probe if t.kind == kind and t.queue == q)
            line.append(f"{kind} {a}{' | ' + str(b) if a != b else ''}")
            if kind == "pop" and a != b:
                r.differ(f"probe: {a} {q} pops in the real trace, {b} in the replica's")
        r.say(f"  {q:5} " + ", ".join(line))
    r.say()
    r.say("phases: real " + ", ".join(f"{p.name} {len(p.frames)}" for p in real.phases)
          + " | replica " + ", ".join(f"{p.name} {len(p.frames)}" for p in rep.phases))
    if [p.name for p in real.phases] != [p.name for p in rep.phases]:
        r.differ("the phases differ")
    for pa, pb in zip(real.phases, rep.phases, strict=False):
        r.say()
        r.say(f"== {pa.name} == frames: real {len(pa.frames)}, replica {len(pb.frames)}")
        exact = pa.name != BURST
        _count_table(r, pa.frames, pb.frames, exact)
        if len(pa.frames) != len(pb.frames):
            r.differ(f"{pa.name}: {len(pa.frames)} frames in the real trace, "
                     f"{len(pb.frames)} in the replica's")
        if pa.name == BURST or pb.name == BURST:
            r.say(f"  real     {_compact(pa.frames)}")
            r.say(f"  replica  {_compact(pb.frames)}")
            r.say("  (K kick, P pop, f fill, N notify, I irq, all TX; the kicks and interrupts "
                  "of a burst depend on timing)")
            _burst_ok(r, "real", pa.frames)
            _burst_ok(r, "replica", pb.frames)
            continue
        for i, (fa, fb) in enumerate(zip(pa.frames, pb.frames, strict=False)):
            r.say(f"  frame {i}: {'real':34} replica")
            if _side_by_side(r, fa, fb):
                continue
            race = _kick_race(rep, pb.frames[i - 1], fb) if i else None
            raced = _raced_keys(fa.keys())
            if race is not None and fb.keys() in raced:
                r.races.append(f"{pa.name} frame {i}")
                r.say(f"  race: the replica's pop of frame {i} ran in the {race.name} pass "
                      f"that popped frame {i - 1} (its trace: {race.name} from "
                      f"{race.ts / 1e9:.6f} s to {race.end / 1e9:.6f} s): the driver queued "
                      "it while QEMU still had notifications off, so no kick was due "
                      "(vring_need_event against the avail_event QEMU had not moved)"
                      + ("" if fb.keys() == raced[0] else
                         "; completed in that pass before the driver had taken frame "
                         f"{i - 1}'s interrupt, it was due none of its own (used_event)")
                      + "; QEMU on fast hardware does the same")
                continue
            r.differ(f"{pa.name} frame {i}: the event sequences differ")
    r.say()
    if r.problems:
        r.say(f"verdict: {len(r.problems)} difference(s)")
    elif r.races:
        r.say(f"verdict: the same, but for {len(r.races)} kick race(s) the replica's trace "
              f"proves ({', '.join(r.races)})")
    else:
        r.say("verdict: the same")
    return r


def _raced_keys(real: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """What a real frame that began with its kick looks like when its chain was queued during
    the previous frame's TX pass: without the kick, and maybe without its TX interrupt."""
    if real[:1] != [("kick", "TX", "")]:
        return []
    out = [real[1:]]
    if real[-2:] == [("notify", "TX", ""), ("irq", "TX", "")]:
        out.append(real[1:-2])
    return out


def _kick_race(rep: Side, prev: Frame, frame: Frame) -> Pass | None:
    """The TX handler pass that popped both ``prev`` and ``frame`` in the replica's trace:
    ``frame`` was queued while the pass ran, before it re-enabled notifications."""
    p = rep.pass_of(frame.pop)
    return p if p is not None and rep.pass_of(prev.pop) == p else None


# -- the command --------------------------------------------------------------------------------

USAGE = "vreplica trace compare REAL.log REPLICA.json|REPLICA.log [--events]"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vreplica trace compare", add_help=True,
                                description="line up a real QEMU trace log with a replica "
                                            "trace, phase by phase and frame by frame")
    p.add_argument("real", help="QEMU's log (-trace ... -D FILE)")
    p.add_argument("replica", help="the replica's --trace FILE.json or FILE.log")
    p.add_argument("--events", action="store_true",
                   help="also list each side's events as logged, frame by frame")
    p.error = lambda message: _usage(message)  # type: ignore[method-assign]
    a = p.parse_args(argv)
    try:
        real, rep = read_side(a.real), read_side(a.replica)
    except CompareError as e:
        print(f"vreplica trace compare: {e}", file=sys.stderr)
        return 2
    report = compare(real, rep)
    print("\n".join(report.lines))
    if a.events:
        for side in (real, rep):
            print(f"\n{side.label}:")
            for ph in side.phases:
                for i, f in enumerate(ph.frames):
                    print(f"  {ph.name} frame {i}:")
                    for t in f.toks:
                        print(f"    {t.tid} {t.ts / 1e9:.6f} {t.source}")
    return 0 if not report.problems else 1


def _usage(message: str) -> None:
    print(f"vreplica trace compare: {message} ({USAGE})", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
