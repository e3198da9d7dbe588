"""Every trace event of the replica, by process: what ``--trace-events help`` lists (QEMU's
``-trace help``) and what ``--trace-events`` patterns are checked against.

The list is read from ``common.trace``'s registry after importing each process package's
modules, so it is what the code declares, not a copy: an event renamed or added in a process
is listed as it is named there.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil

from common import trace

PROCESSES = {"guest": "guestproc", "kvm": "kvmproc", "qemu": "qemuproc"}
"""Each process and its package."""
SPANS = "spans"
"""The pattern that selects the function spans (``@traced``) rather than an event."""


def _import_process_modules() -> None:
    for package in PROCESSES.values():
        pkg = importlib.import_module(package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name != "__main__":  # the process's entry point: it would start running
                importlib.import_module(f"{package}.{mod.name}")


def events_by_process() -> dict[str, list[str]]:
    """Process -> the names of the trace events its modules declare, sorted; events declared
    in a shared package (``common``) come under that package's name."""
    _import_process_modules()
    label = {package: role for role, package in PROCESSES.items()}
    out: dict[str, list[str]] = {role: [] for role in PROCESSES}
    for name, packages in sorted(trace.DECLARED_BY.items()):
        for package in packages:
            out.setdefault(label.get(package, package), []).append(name)
    return out


def unmatched_patterns(patterns: list[str]) -> list[str]:
    """The glob patterns (of a ``--trace-events`` list) that select nothing."""
    names = {name for names in events_by_process().values() for name in names}
    return [p for p in patterns
            if p != SPANS and not any(fnmatch.fnmatchcase(n, p) for n in names)]


def format_help() -> str:
    """The events by process, one name a line, as QEMU's ``-trace help`` prints them."""
    lines = []
    for role, names in events_by_process().items():
        lines.append(f"{role} ({PROCESSES.get(role, 'every process that uses it')}):")
        lines += [f"  {name}" for name in names]
    lines.append(f"{SPANS}: the function spans of every process (@traced)")
    return "\n".join(lines)
