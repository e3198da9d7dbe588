"""Tracing in QEMU's trace-events discipline: every event named, cheap, off by default.

Two kinds of record, both stamped with CLOCK_MONOTONIC (one clock for all processes):

* trace points (``TraceEvent``): QEMU's own trace-event names (``virtqueue_pop``, ...) or, for
  steps QEMU does not trace, the function's name. A call site reads
  ``if trace_x.on: trace_x(...)``, so a disabled event costs one attribute test and no call.
  Each can be switched at run time, like QEMU's ``trace-event NAME on|off``.
* spans (``@traced``): a function's entry and return, which give the call chain its nesting.
  They exist only in a process started with tracing on (``VREPLICA_TRACE=1`` in its
  environment) and spans selected; otherwise the decorator hands back the function itself
  and costs nothing.

``VREPLICA_TRACE_EVENTS`` (``--trace-events``) chooses what starts on, like QEMU's
``-trace enable=PATTERN``: comma-separated globs, ``spans`` for the spans.

Each process dumps its records into the run directory; ``vreplica.trace.tracefile`` merges them
into Chrome Trace Event JSON or QEMU's log-backend text.

QEMU's events carry pointers (``vq %p elem %p``). The replica's stand-ins are fixed fake
addresses, one per object, laid out as QEMU's are (``vq_addr``, ``elem_addr``), so that a
trace reads like QEMU's and the tooling can still tell which queue and descriptor head an
address stands for (``vq_index``, ``elem_head``).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from time import monotonic_ns
from typing import Any, TypeVar

import msgpack

F = TypeVar("F", bound=Callable[..., Any])

ENABLED = os.environ.get("VREPLICA_TRACE", "") == "1"
"""The process was started with tracing: its records are dumped at exit."""
SELECTED = tuple(p for p in os.environ.get("VREPLICA_TRACE_EVENTS", "").split(",") if p)
"""With tracing, the events that start on, as globs (QEMU's ``-trace enable=PATTERN``);
``spans`` selects the function spans. Empty: everything."""
SPANS = ENABLED and (not SELECTED or "spans" in SELECTED)
"""Spans are compiled in (else ``@traced`` hands back the bare function)."""


def _selected(name: str) -> bool:
    return ENABLED and (not SELECTED or any(fnmatch.fnmatchcase(name, p) for p in SELECTED))

_records: list[tuple] = []
_append = _records.append
_ident = threading.get_ident
EVENTS: dict[str, TraceEvent] = {}
DECLARED_BY: dict[str, set[str]] = {}
"""The registry of trace points, as QEMU's trace-events files: event name -> the top-level
packages (``guestproc``, ``kvmproc``, ``qemuproc``) whose modules declare it. A process holds
the entries of what it imported; ``vreplica.trace.events`` imports every process's modules to
list them all."""
_threads: dict[int, tuple[int, str]] = {}


class TraceEvent:
    """One named trace point; call it with the event's arguments."""

    __slots__ = ("name", "on")

    def __init__(self, name: str) -> None:
        self.name = name
        self.on = _selected(name)

    def __call__(self, **args: Any) -> None:
        _append((monotonic_ns(), _ident(), "i", self.name, args))

    def __repr__(self) -> str:
        return f"<TraceEvent {self.name} {'on' if self.on else 'off'}>"


class TraceGroup:
    """One flag for trace points a hot path fires together, on while any of them is (or, with
    ``with_spans``, while spans are recorded): with all off the path pays one test instead of
    one per point. Kept current by ``set_state``/``switch``, the ways events are switched."""

    __slots__ = ("members", "with_spans", "on")

    def __init__(self, members: tuple[TraceEvent, ...], with_spans: bool) -> None:
        self.members = members
        self.with_spans = with_spans
        self.on = False

    def refresh(self) -> None:
        self.on = (self.with_spans and spans.on) or any(m.on for m in self.members)


_groups: list[TraceGroup] = []


def trace_group(*members: TraceEvent, with_spans: bool = False) -> TraceGroup:
    group = TraceGroup(members, with_spans)
    group.refresh()
    _groups.append(group)
    return group


def _refresh_groups() -> None:
    for g in _groups:
        g.refresh()


def trace_event(name: str) -> TraceEvent:
    """Declare (or fetch) the trace point ``name``; the registry notes which process's
    package declared it (``DECLARED_BY``)."""
    package = sys._getframe(1).f_globals.get("__name__", "").partition(".")[0]
    DECLARED_BY.setdefault(name, set()).add(package)
    ev = EVENTS.get(name)
    if ev is None:
        ev = EVENTS[name] = TraceEvent(name)
    return ev


class _SpanState:
    on = SPANS


spans = _SpanState()


def traced(fn: F) -> F:
    """Record ``fn``'s entry and return as a span named after it (only when SPANS)."""
    if not SPANS:
        return fn
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not spans.on:
            return fn(*args, **kwargs)
        _append((monotonic_ns(), _ident(), "B", name, None))
        try:
            return fn(*args, **kwargs)
        finally:
            _append((monotonic_ns(), _ident(), "E", name, None))

    return wrapper  # type: ignore[return-value]


def set_state(pattern: str, on: bool) -> list[str]:
    """Switch every event whose name matches the glob ``pattern``; returns their names."""
    hit = [ev for name, ev in EVENTS.items() if fnmatch.fnmatchcase(name, pattern)]
    for ev in hit:
        ev.on = on
    if pattern in ("*", "spans"):
        spans.on = on
    _refresh_groups()
    return [ev.name for ev in hit]


def switch(states: dict[str, bool]) -> None:
    """Set several events at once (by name), e.g. back to a saved ``states()``."""
    for name, on in states.items():
        EVENTS[name].on = on
    _refresh_groups()


def states() -> dict[str, bool]:
    return {name: ev.on for name, ev in EVENTS.items()}


# -- the fake addresses of QEMU's objects ---------------------------------------------------

VDEV_ADDR = 0x55D0_A4D5_0700
"""The VirtIODevice (one virtio-net device per run)."""
VQ_ARRAY_ADDR = 0x7F87_240A_C010
VQ_STRIDE = 0x98
"""QEMU allocates ``vdev->vq`` as one array of VirtQueue, 0x98 bytes each (7.2, x86-64)."""
ELEM_BASE = 0x55D0_A000_0000
ELEM_QUEUE_SHIFT = 24
ELEM_HEAD_SHIFT = 8
ELEM_SPARE = 0x80
"""A second element for a head still in flight (a guest offering it twice) lies here."""
VIRTQUEUE_ELEMENT_SIZE = 56
"""sizeof(VirtQueueElement) in QEMU 7.2 on x86-64: what virtio-net passes to virtqueue_pop
and ``virtqueue_alloc_element`` reports as ``size``."""


def vq_addr(n: int) -> int:
    return VQ_ARRAY_ADDR + n * VQ_STRIDE


def elem_addr(n: int, head: int, spare: bool = False) -> int:
    return ELEM_BASE + (n << ELEM_QUEUE_SHIFT) + (head << ELEM_HEAD_SHIFT) + (
        ELEM_SPARE if spare else 0)


def as_addr(value: Any) -> int | None:
    """A pointer argument as recorded (int) or as printed (``0x...``), as an int."""
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 16)
    except ValueError:
        return None


def vq_index(value: Any) -> int | None:
    """The queue index a replica VirtQueue address stands for (None if it is none)."""
    a = as_addr(value)
    if a is None or a < VQ_ARRAY_ADDR or (a - VQ_ARRAY_ADDR) % VQ_STRIDE:
        return None
    n = (a - VQ_ARRAY_ADDR) // VQ_STRIDE
    return n if n < 1024 else None


def elem_head(value: Any) -> tuple[int, int] | None:
    """(queue index, descriptor head) of a replica element address (None if it is none)."""
    a = as_addr(value)
    if a is None or a < ELEM_BASE:
        return None
    off = a - ELEM_BASE
    n, rest = off >> ELEM_QUEUE_SHIFT, off & ((1 << ELEM_QUEUE_SHIFT) - 1)
    if n >= 1024 or rest & ~ELEM_SPARE & ((1 << ELEM_HEAD_SHIFT) - 1):
        return None
    return n, rest >> ELEM_HEAD_SHIFT


def register_thread(name: str | None = None) -> None:
    t = threading.current_thread()
    _threads[t.ident or 0] = (t.native_id or 0, name or t.name)


def records() -> list[tuple]:
    return _records


def dump(path: str | Path, role: str) -> None:
    """Write this process's records for the merger (msgpack)."""
    for t in threading.enumerate():
        _threads.setdefault(t.ident or 0, (t.native_id or 0, t.name))
    data = {
        "role": role,
        "pid": os.getpid(),
        "threads": {str(k): list(v) for k, v in _threads.items()},
        "records": [list(r) for r in _records],
    }
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(msgpack.packb(data, use_bin_type=True, default=str))
    tmp.rename(path)
