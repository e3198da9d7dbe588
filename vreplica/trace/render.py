"""vreplica trace render: a trace file as a swimlane picture (SVG or PNG).

One lane per process and thread, time on the x axis, each span and trace point a box with its
name, stacked by call depth; arrows follow a packet's flow where control passes from one
thread to another (red where it crosses a process; in a round trip, the reply's arrows are
blue). Spans that were already running when the picture starts (``main_loop_wait``,
``kvm_arch_vcpu_ioctl_run``) are drawn cut at its edge.

A trace of an echo run draws a datagram's round trip (to the host and the reply back); a
trace of a transmit-only run, the datagram's journey to the host.

Not part of the replicated system: a viewer for its traces.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vreplica.run.preflight import UsageError, finite_float, writable_file
from vreplica.trace.tracefile import (
    ROLES,
    RX,
    TX,
    Event,
    Trace,
    TraceError,
    chain_events,
    load_trace,
    packet,
)

matplotlib.use("Agg")

FORMATS = (".svg", ".png")
COLORS = {"guest": "#4c72b0", "kvm": "#dd8452", "qemu": "#55a868"}
FONT_PT = 6.5
CHAR_IN = FONT_PT * 0.6 / 72
BAR_IN = 0.11
SUB_IN = 0.12
MAX_SUBLINES = 4
LANE_GAP_IN = 0.12
LABEL_COL_IN = 1.3
MAX_EVENTS = 4000
TX_CROSSING, RX_CROSSING = "#c0392b", "#2e86c1"
"""Arrows across processes: a transmitted datagram's, a received one's."""


class RenderError(Exception):
    """The request cannot be drawn: the one line the user sees."""


@dataclass
class _Row:
    level: int
    items: list[Event] = field(default_factory=list)
    labels: list[tuple[Event, int]] = field(default_factory=list)
    sublines: int = 1


@dataclass
class _Lane:
    key: tuple[int, int]
    title: str
    role: str
    rows: dict[int, _Row] = field(default_factory=dict)
    y0: float = 0.0
    row_y: dict[int, float] = field(default_factory=dict)

    @property
    def height(self) -> float:
        return sum(BAR_IN + r.sublines * SUB_IN for r in self.rows.values())


def _folded(ev: Event) -> bool:
    """A trace point inside the span of the same name: the span's box stands for both."""
    return not ev.is_span and ev.parent is not None and ev.parent.name == ev.name


def _lanes(trace: Trace, events: list[Event]) -> list[_Lane]:
    members = set(events)
    lanes: dict[tuple[int, int], _Lane] = {}
    for ev in events:
        if _folded(ev):
            continue
        lane = lanes.get(ev.thread_key)
        if lane is None:
            lane = lanes[ev.thread_key] = _Lane(
                ev.thread_key, f"{ev.role}\n{trace.thread_name(ev)}", ev.role)
        level = sum(1 for a in ev.ancestors() if a in members)
        lane.rows.setdefault(level, _Row(level)).items.append(ev)

    def order(lane: _Lane) -> tuple:
        pid, tid = lane.key
        return (ROLES.index(lane.role) if lane.role in ROLES else 9, tid != pid, tid)

    return sorted(lanes.values(), key=order)


def _place_labels(lanes: list[_Lane], us_per_in: float, x0: int) -> None:
    """Greedy: each label goes on the first subline under its row where it overlaps nothing;
    when all are taken, on the one that frees up first (it overlaps: no box goes unnamed)."""
    for lane in lanes:
        for row in lane.rows.values():
            ends: list[float] = []
            for ev in sorted(row.items, key=lambda e: e.ts):
                start = max(ev.ts, x0) / 1000
                width = (len(ev.name) + 1) * CHAR_IN * us_per_in
                for k, end in enumerate(ends):
                    if start >= end:
                        ends[k] = start + width
                        row.labels.append((ev, k))
                        break
                else:
                    if len(ends) < MAX_SUBLINES:
                        ends.append(start + width)
                        row.labels.append((ev, len(ends) - 1))
                    else:
                        k = min(range(len(ends)), key=ends.__getitem__)
                        ends[k] = max(ends[k], start) + width
                        row.labels.append((ev, k))
            row.sublines = max(1, len(ends))


def draw(trace: Trace, events: list[Event], arrows: list[list[Event]], start: int, end: int,
         ref: int, xlabel: str, title: str, out: Path) -> None:
    """Draw ``events`` between ``start`` and ``end`` (ns), x relative to ``ref``, into ``out``."""
    if len(events) > MAX_EVENTS:
        raise RenderError(f"{len(events)} events in the window: narrow it (at most {MAX_EVENTS})")
    lanes = _lanes(trace, events)
    if not lanes:
        raise RenderError("nothing to draw in that window")
    n = sum(len(r.items) for lane in lanes for r in lane.rows.values())
    plot_w = min(40.0, max(11.0, 0.22 * n))
    span_us = max((end - start) / 1000, 1e-3)
    _place_labels(lanes, span_us / plot_w, start)
    y = 0.0
    for lane in lanes:
        lane.y0 = y
        for level in sorted(lane.rows):
            lane.row_y[level] = y
            y += BAR_IN + lane.rows[level].sublines * SUB_IN
        y += LANE_GAP_IN
    height = y + 0.9
    fig = Figure(figsize=(plot_w + LABEL_COL_IN + 0.4, height))
    ax = fig.add_axes((LABEL_COL_IN / (plot_w + LABEL_COL_IN + 0.4), 0.6 / height,
                       plot_w / (plot_w + LABEL_COL_IN + 0.4), (height - 0.9) / height))
    ax.set_xlim((start - ref) / 1000, (end - ref) / 1000)
    ax.set_ylim(y, 0)
    min_w = span_us * 0.003
    centers: dict[Event, tuple[float, float]] = {}
    for lane in lanes:
        color = COLORS.get(lane.role, "#888888")
        ax.add_patch(Rectangle(((start - ref) / 1000, lane.y0), span_us, lane.height,
                               facecolor=color, alpha=0.06, linewidth=0))
        ax.text(-0.01, lane.y0 + lane.height / 2, lane.title, transform=ax.get_yaxis_transform(),
                ha="right", va="center", fontsize=8, color=color, fontweight="bold")
        for level, row in lane.rows.items():
            ry = lane.row_y[level]
            for ev in row.items:
                x = (max(ev.ts, start) - ref) / 1000
                w = max(((min(ev.end, end) - max(ev.ts, start)) / 1000), min_w)
                span = ev.is_span
                ax.add_patch(Rectangle((x, ry + 0.01), w, BAR_IN - 0.02,
                                       facecolor=color, alpha=0.45 if span else 0.95,
                                       edgecolor=color, linewidth=0.4))
                centers[ev] = (x + (0 if span else w / 2), ry + BAR_IN / 2)
            for ev, k in row.labels:
                x = (max(ev.ts, start) - ref) / 1000
                ax.text(x, ry + BAR_IN + (k + 0.8) * SUB_IN, ev.name, fontsize=FONT_PT,
                        ha="left", va="baseline", color="#222222" if ev.is_span else color,
                        clip_on=True)
    for ev in events:
        if _folded(ev) and ev.parent in centers:
            centers[ev] = ((ev.ts - ref) / 1000, centers[ev.parent][1])
    rx_ids = {id(p.steps) for p in trace.replies.values()}
    for steps in arrows:
        for a, b in zip(steps, steps[1:], strict=False):
            if a.thread_key == b.thread_key or a not in centers or b not in centers:
                continue
            crossing = a.pid != b.pid
            color = RX_CROSSING if id(steps) in rx_ids else TX_CROSSING
            ax.annotate("", xy=centers[b], xytext=centers[a],
                        arrowprops={"arrowstyle": "->", "lw": 1.1 if crossing else 0.7,
                                    "color": color if crossing else "#7f8c8d",
                                    "shrinkA": 1, "shrinkB": 1})
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(out, dpi=110)


def _render_chains(trace: Trace, seq: int, directions: tuple[str, ...], title: str,
                   out: str | Path, window: tuple[float, float] | None) -> Path:
    """Datagram ``seq``'s chains in ``directions`` (with the spans they ran inside of), x
    relative to the guest's ``udp_sendmsg``; by default the window the chains span."""
    out = _check_out(out)
    chains = [chain_events(trace, seq, d) for d in directions]
    first = chains[0][0][0].ts
    last = max(ev.end for chain, _ in chains for ev in chain)
    pad = max((last - first) // 30, 1000)
    start, end = first - pad, last + pad + (last - first) // 12
    if window is not None:
        start, end = trace.start + round(window[0] * 1000), trace.start + round(window[1] * 1000)
    union = list(dict.fromkeys([ev for _, context in chains for ev in context]
                               + [ev for chain, _ in chains for ev in chain]))
    events = [ev for ev in union if ev.end >= start and ev.ts <= end]
    draw(trace, events, [packet(trace, seq, d).steps for d in directions], start, end, first,
         f"microseconds since the guest's udp_sendmsg of seq {seq}", title, out)
    return out


def render_packet(trace: Trace, seq: int, out: str | Path,
                  window: tuple[float, float] | None = None) -> Path:
    """Packet ``seq``'s chain (and the spans it ran inside of) as a swimlane picture."""
    return _render_chains(trace, seq, (TX,), f"packet seq {seq}: guest udp_sendmsg -> KVM -> "
                          "QEMU/slirp sendto -> completion interrupt back in the guest",
                          out, window)


def render_round_trip(trace: Trace, seq: int, out: str | Path,
                      window: tuple[float, float] | None = None) -> Path:
    """Datagram ``seq``'s round trip of an echo run: its chain to the host and its reply's
    back to the guest socket (with the spans they ran inside of), as a swimlane picture."""
    return _render_chains(trace, seq, (TX, RX), f"round trip seq {seq}: guest udp_sendmsg -> "
                          "KVM -> QEMU/slirp sendto -> host echo (red); slirp recvfrom -> "
                          "virtio-net RX -> irqfd -> guest recvfrom (blue)", out, window)


def render_seq(trace: Trace, seq: int, out: str | Path,
               window: tuple[float, float] | None = None) -> Path:
    """Seq's round trip if the trace has both the datagram and its reply, else its journey
    to the host (a transmit-only run)."""
    if seq in trace.packets and seq in trace.replies:
        return render_round_trip(trace, seq, out, window)
    return render_packet(trace, seq, out, window)


def render_window(trace: Trace, start_us: float, end_us: float, out: str | Path) -> Path:
    """Every event between ``start_us`` and ``end_us`` (since the trace's first event)."""
    out = _check_out(out)
    if end_us <= start_us:
        raise RenderError("--window: END_US must be greater than START_US")
    start, end = trace.start + round(start_us * 1000), trace.start + round(end_us * 1000)
    events = [ev for ev in trace.events if ev.end >= start and ev.ts <= end]
    arrows = [p.steps for p in [*trace.packets.values(), *trace.replies.values()]
              if any(start <= s.ts <= end for s in p.steps)]
    draw(trace, events, arrows, start, end, trace.start,
         "microseconds since the trace's first event",
         f"trace window {start_us:g}..{end_us:g} us", out)
    return out


def _check_out(out: str | Path) -> Path:
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise RenderError(f"{path}: the picture must be .svg or .png")
    try:
        writable_file("OUT", path)
    except UsageError as e:
        raise RenderError(str(e)) from None
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RenderError(message)


def _parser() -> _Parser:
    p = _Parser(prog="vreplica trace render", add_help=False,
                description="Draw a trace as a swimlane picture.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("trace", metavar="TRACE.json",
                   help="a trace written by --trace (Chrome trace JSON)")
    p.add_argument("out", metavar="OUT", help="the picture: OUT.svg or OUT.png")
    p.add_argument("--packet", type=int, metavar="SEQ",
                   help="the datagram whose journey (its round trip in an echo run) to draw "
                        "(default: the middle one)")
    p.add_argument("--window", type=finite_float, nargs=2, metavar=("START_US", "END_US"),
                   help="the time range, in microseconds since the trace's first event")
    return p


USAGE = ("usage: vreplica trace render TRACE.json OUT.svg|OUT.png [--packet SEQ] "
         "[--window START_US END_US] | vreplica trace show TRACE.json [--packet SEQ] | "
         "vreplica trace compare REAL.log REPLICA.json|.log")


def main(argv: list[str] | None = None) -> int:
    """``vreplica trace render ...``: bad input is one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"vreplica trace: {USAGE}", file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(USAGE + "\n  draws one packet's journey (an echo run: its round trip), or a time "
              "window, across the three processes' threads")
        return 0
    if args[0] == "show":
        from vreplica.trace.show import show_main

        return show_main(args[1:])
    if args[0] == "compare":
        from vreplica.trace.compare import main as compare_main

        return compare_main(args[1:])
    if args[0] != "render":
        print(f"vreplica trace: unknown command {args[0]!r} ({USAGE})", file=sys.stderr)
        return 2
    if any(arg in ("-h", "--help") for arg in args[1:]):
        print(_parser().format_help(), end="")
        return 0
    try:
        a = _parser().parse_args(args[1:])
        _check_out(a.out)
        trace = load_trace(a.trace)
        if a.packet is None and a.window is not None:
            out = render_window(trace, a.window[0], a.window[1], a.out)
        else:
            seq = a.packet
            if seq is None:
                if not trace.packets:
                    raise RenderError(f"{a.trace}: no packet paths in this trace "
                                      "(use --window START_US END_US)")
                seqs = sorted(set(trace.packets) & set(trace.replies)) or sorted(trace.packets)
                seq = seqs[len(seqs) // 2]
            out = render_seq(trace, seq, a.out, a.window)
    except (RenderError, TraceError) as e:
        print(f"vreplica trace render: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
