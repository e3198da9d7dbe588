"""Stands for monitor/monitor-internal.h: the Monitor as the HMP, QMP and misc-command files
see it, so that they need not import monitor.py, which builds them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from common.cpus import Gate
from common.monitor.commands import Command, CommandTable


class MonitorHMP(Protocol):
    """What the other parts use of the human monitor (MonitorHMP)."""

    history: Iterable[str]

    def handle_hmp_command(self, line: str) -> str: ...


class Monitor(Protocol):
    """One process's monitor (monitor.Monitor is the one implementation)."""

    role: str
    table: CommandTable
    gates: list[Gate]
    step_gate: Gate | None
    stats: Callable[[], dict]
    status_info: Callable[[], dict]
    debugging: bool
    hmp: MonitorHMP
    qmp: Any

    def command(self, name: str | None = None, *, hmp: str | None = None, qmp: bool = True,
                args: tuple = (), params: str = "", help: str = "",
                human: Callable[[Any], str] | None = None,
                hmp_fn: Callable[..., Any] | None = None) -> Callable: ...

    def hmp_execute(self, line: str) -> tuple[Command, Any]: ...

    def take_after_reply(self) -> Callable[[], None] | None: ...

    def run_state(self) -> str: ...

    def vm_stop(self) -> dict[str, Any]: ...

    def vm_start(self) -> None: ...

    def step(self, count: int) -> dict[str, Any]: ...
