"""Stands for QEMU's ``log`` trace backend (scripts/tracetool/backend/log.py, ``-D FILE``):
one line per event, ``TID@SEC.USEC:name args``, the arguments in the event's own format.

``write_qemu_log`` writes a merged replica trace so: every process's trace points in one
file, in time order, each under the id of the thread that fired it (QEMU's log prints
``qemu_get_thread_id()``), stamped with the wall clock as QEMU's ``gettimeofday`` is. Events
under a QEMU name are printed with QEMU's format (``qemuproc.trace_events``); the others
(the Linux tracepoints of the guest and of KVM, and the replica's named steps) as
``key value`` pairs. Spans have no line: QEMU's log has no function entry and return.

``read_qemu_log`` reads such a file back, or a real QEMU's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, NamedTuple

from qemuproc.trace_events import format_event, hexaddr, parse_event, pointer_args

LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+)(?: (.*))?$")


class LogEvent(NamedTuple):
    """One line of a QEMU log: when (ns), which thread, what, with which arguments."""

    ts: int
    tid: int
    name: str
    args: dict[str, Any]


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return str(int(v))
    return str(v).replace(" ", "_") if isinstance(v, str) else str(v)


def format_line(tid: int, wall_ns: int, name: str, args: dict[str, Any]) -> str:
    """One log line, as QEMU's log backend prints it."""
    text = format_event(name, args)
    if text is None:
        ptrs = pointer_args(name)
        text = " ".join(f"{k} {hexaddr(v) if k in ptrs else _value(v)}"
                        for k, v in args.items())
    sec, usec = divmod(wall_ns // 1000, 1_000_000)
    return f"{tid}@{sec}.{usec:06d}:{name} {text}"


def write_qemu_log(events: list[Any], out: str | Path) -> int:
    """Write the trace points of ``events`` (``tracefile.Event``, in time order; their ``ts``
    CLOCK_MONOTONIC ns) as a QEMU log; returns the number of lines."""
    wall_offset = time.time_ns() - time.monotonic_ns()
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for ev in events:
            if ev.is_span:
                continue
            f.write(format_line(ev.tid, ev.ts + wall_offset, ev.name, ev.args) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_qemu_log(path: str | Path) -> list[LogEvent]:
    """The trace lines of a QEMU log (other lines, e.g. ``-msg timestamp=on`` messages, are
    skipped), in file order."""
    out: list[LogEvent] = []
    with Path(path).open(errors="replace") as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if m is None:
                continue
            tid, sec, usec, name, text = m.groups()
            out.append(LogEvent((int(sec) * 1_000_000 + int(usec)) * 1000, int(tid), name,
                                parse_event(name, text or "")))
    return out
