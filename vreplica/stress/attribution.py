"""The stress run's accounting of loss: which chaos event lost which datagram, by sequence
number, and how long each event kept the device down.

A host -> guest path (the inbound stream; the echo replies of one guest flow) is FIFO end to
end, so a run of sequence numbers the guest never got was lost in the silence between the
arrival of the path's last number before the run and its first after it (the guest reports
both: common.seqwindow). A ring fault's device reset or a killed QEMU whose
outage overlaps that silence explains the run; nothing else does (a paused guest or echo
service loses nothing on these paths: the net queue, the rings and the echo service's socket
buffer hold it). Each event's outage is measured, not
assumed: a reset from the host's signal to the guest's ``virtnet_reset`` end (the guest's
own log: config interrupt, DRIVER_OK, RX buffers posted), a restart from the kill to the
new QEMU's device being ready (its -incoming record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LOSSY_KINDS = ("ring-fault", "kill-device", "kill-backend")
"""The chaos kinds that lose frames in flight; the others must lose nothing on these paths."""


@dataclass
class Outage:
    """One chaos event: when it began and when the device was whole again (monotonic ns)."""

    kind: str
    t_s: float
    start_ns: int
    end_ns: int = 0
    lost: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def down_ms(self) -> float | None:
        return round((self.end_ns - self.start_ns) / 1e6, 2) if self.end_ns else None


def outages(events: list[dict[str, Any]], reset_log: list[dict[str, int]],
            incomings: list[dict[str, Any]]) -> list[Outage]:
    """The chaos log's events with their measured ends: the k-th ring fault ends with the
    first guest reset that began after it, a kill with the first QEMU ready after it."""
    out: list[Outage] = []
    resets = sorted(reset_log, key=lambda r: r["start_ns"])
    readies = sorted(r["ready_ns"] for r in incomings if r.get("ready_ns"))
    used = 0
    for e in events:
        o = Outage(e["kind"], e["t_s"], e.get("start_ns", 0), e.get("end_ns", 0),
                   detail={k: v for k, v in e.items()
                           if k not in ("kind", "t_s", "start_ns", "end_ns")})
        if o.kind == "ring-fault":
            while used < len(resets) and resets[used]["start_ns"] < o.start_ns:
                used += 1
            if used < len(resets):
                r = resets[used]
                used += 1
                o.end_ns = r.get("end_ns", 0)
                o.detail |= {
                    "rx_down_ms": round((r["rx_posted_ns"] - r["start_ns"]) / 1e6, 2)
                    if r.get("rx_posted_ns") else None,
                    "reset_ms": round((r["end_ns"] - r["start_ns"]) / 1e6, 2)
                    if r.get("end_ns") else None,
                    "rx_unprocessed": r.get("rx_unprocessed", 0),
                    "tx_unsent": r.get("tx_unsent", 0)}
        elif o.kind == "kill-device":
            o.end_ns = next((t for t in readies if t > o.start_ns), 0)
        out.append(o)
    return out


def begin_at_entry(runs: list[list[int]], entered_ns: Sequence[int]) -> None:
    """Start each run's silence no later than its first number entered the path (its send
    from the host): the receiver's arrival time of the number before it can come after the
    loss (``common.seqwindow`` does the same for the guest's own sends)."""
    for run in runs:
        if run[2] and run[0] < len(entered_ns) and 0 < entered_ns[run[0]] < run[2]:
            run[2] = entered_ns[run[0]]


def attribute(runs: list[list[int]], stride: int, events: list[Outage],
              now_ns: int) -> tuple[int, int, list[list[int]]]:
    """Give each run [first, last, after_ns, before_ns] of lost sequence numbers (every
    ``stride``-th) to the lossy event whose outage overlaps its silence; returns (lost,
    explained, the runs nothing explains)."""
    lost = explained = 0
    unexplained: list[list[int]] = []
    lossy = [e for e in events if e.kind in LOSSY_KINDS]
    for first, last, after_ns, before_ns in runs:
        n = (last - first) // stride + 1
        lost += n
        hi = before_ns or now_ns
        for e in lossy:
            if e.start_ns <= hi and (e.end_ns or now_ns) >= after_ns:
                e.lost += n
                explained += n
                break
        else:
            unexplained.append([first, last, after_ns, before_ns])
    return lost, explained, unexplained


def explain_seqs(seqs: set[int], runs: list[list[int]], stride: int) -> list[list[int]]:
    """``runs`` without the sequence numbers ``seqs`` (explained one by one elsewhere), each
    run split where they were; the silences stay those of the original run."""
    out = []
    for first, last, after_ns, before_ns in runs:
        cur: list[int] | None = None
        for seq in range(first, last + 1, stride):
            if seq in seqs:
                if cur is not None:
                    out.append(cur)
                    cur = None
            elif cur is None:
                cur = [seq, seq, after_ns, before_ns]
            else:
                cur[1] = seq
        if cur is not None:
            out.append(cur)
    return out


def run_total(runs: list[list[int]], stride: int) -> int:
    """How many sequence numbers ``runs`` hold (every ``stride``-th from first to last)."""
    return sum((last - first) // stride + 1 for first, last, *_ in runs)


def summary_of(events: list[Outage]) -> dict[str, Any]:
    """The figures the verdict and the benchmark show: outage times and the most frames one
    event lost, per lossy kind."""
    out: dict[str, Any] = {}
    for kind, key in (("ring-fault", "reset"), ("kill-device", "restart")):
        evs = [e for e in events if e.kind == kind]
        downs = [e.down_ms for e in evs if e.down_ms is not None]
        out[f"{key}s"] = len(evs)
        out[f"{key}_down_ms"] = downs
        out[f"{key}_down_ms_max"] = max(downs) if downs else None
        out[f"{key}_lost_max"] = max((e.lost for e in evs), default=0)
        if kind == "ring-fault":
            rx = [e.detail["rx_down_ms"] for e in evs if e.detail.get("rx_down_ms") is not None]
            out["reset_rx_down_ms_max"] = max(rx) if rx else None
    return out
