"""Stands for monitor/misc.c, monitor/qmp-cmds.c and trace/qmp.c: the commands every
process's monitor has (help, status, stop / cont / step, trace events, history, version)
and HMP's memory dump (``x`` / ``xp``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common import trace
from common.monitor.commands import Arg, MonitorError

if TYPE_CHECKING:
    from common.monitor.monitor_internal import Monitor

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "virtio-net-replica"}
"""query-version: the QEMU release whose behaviour the replica reproduces, and who it is."""
SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}
MAX_STEP = 1000
FMT = Arg("fmt", "fmt", hmp_prefix="/")


def process_stats() -> dict[str, Any]:
    """This process as the kernel sees it (psutil)."""
    import psutil

    p = psutil.Process()
    with p.oneshot():
        cpu = p.cpu_times()
        ctx = p.num_ctx_switches()
        return {"pid": p.pid, "threads": p.num_threads(),
                "cpu_user_s": round(cpu.user, 3), "cpu_system_s": round(cpu.system, 3),
                "rss_bytes": p.memory_info().rss,
                "ctx_switches": {"voluntary": ctx.voluntary, "involuntary": ctx.involuntary}}


def _info_status_text(d: dict[str, Any]) -> str:
    state = d["status"]
    lines = [f"VM status: {'running' if state == 'running' else 'paused'}"
             + (f" ({state})" if state not in ("running", "paused") else "")]
    for name, t in d["threads"].items():
        lines.append(f"{name}: {t['state']}"
                     + (f", in {t['where']}" if t["state"] != "parked" else ""))
    for k, v in d.items():
        if k in ("status", "running", "singlestep", "role", "pid", "threads"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _step_text(d: dict[str, Any]) -> str:
    done, events = d["iterations"], d["events"]
    lines = [f"{d['thread']}: {done} iteration{'s' if done != 1 else ''}, "
             f"{len(events)} trace event{'s' if len(events) != 1 else ''}"]
    for e in events:
        args = " ".join(f"{k}={v}" for k, v in (e["args"] or {}).items())
        lines.append(f"  +{e['ts_us']:9.1f} us  {e['name']} {args}".rstrip())
    if not d["completed"]:
        lines.append(f"  (the iteration has not finished: {d['where']})")
    return "\n".join(lines)


def _stop_text(d: dict[str, Any]) -> str:
    return "\n".join(f"{name}: stops when {t['where']} returns"
                     for name, t in d["threads"].items() if t["state"] != "parked")


def register_common(mon: Monitor) -> None:
    cmd = mon.command

    @cmd(hmp="help", qmp=False, args=(Arg("command", "rest", True),), params="[command]",
         help="show the commands, or one command's help",
         human=lambda rows: "\n".join(f"{r['name']}{' ' + r['args'] if r['args'] else ''} -- "
                                      f"{r['help']}" for r in rows))
    def help_(command: str = "") -> list[dict[str, str]]:
        return [{"name": c.hmp or "", "args": c.params, "help": c.help}
                for c in mon.table.hmp_commands()
                if not command or c.hmp == command or (c.hmp or "").startswith(command + " ")]

    def info_status() -> dict[str, Any]:
        return {**query_status(), "role": mon.role, "pid": os.getpid(),
                "threads": {g.name: g.describe() for g in mon.gates}, **mon.status_info()}

    @cmd("query-status", hmp="info status", hmp_fn=info_status, human=_info_status_text,
         help="show the VM's run state, and where each of the process's loops is")
    def query_status() -> dict[str, Any]:
        state = mon.run_state()
        return {"status": state, "singlestep": False, "running": state == "running"}

    def hmp_stop() -> dict[str, Any]:
        threads = mon.vm_stop()
        return {"status": mon.run_state(), "threads": threads}

    @cmd("stop", hmp="stop", hmp_fn=hmp_stop, human=_stop_text,
         help="stop the process's loops at their next safe point")
    def stop() -> None:
        mon.vm_stop()

    def hmp_cont() -> dict[str, Any]:
        mon.vm_start()
        return {"status": mon.run_state()}

    @cmd("cont", hmp="cont", hmp_fn=hmp_cont, human=lambda d: "",
         help="resume the process's loops")
    def cont() -> None:
        mon.vm_start()

    @cmd(hmp="step", qmp=False, args=(Arg("count", "int", True),), params="[N]",
         human=_step_text,
         help="while stopped: run N (1) iterations of the loop and show the trace events "
              "they produced")
    def step(count: int = 1) -> dict[str, Any]:
        if not 1 <= count <= MAX_STEP:
            raise MonitorError(f"step: N must be 1..{MAX_STEP}", "InvalidParameter")
        return mon.step(count)

    @cmd("trace-event-set-state", hmp="trace-event",
         args=(Arg("name"), Arg("enable", "bool")), params="name on|off",
         human=lambda d: "", help="switch trace events (glob patterns allowed)")
    def trace_event_set_state(name: str, enable: bool) -> dict:
        names = trace.set_state(name, enable)
        if not names and name not in ("*", "spans"):
            raise MonitorError(f'unknown event "{name}"')
        return {}

    @cmd("trace-event-get-state", hmp="info trace-events",
         args=(Arg("name", optional=True),), params="[name]",
         human=lambda rows: "\n".join(f"{r['name']} : state {int(r['state'] == 'enabled')}"
                                      for r in rows),
         help="show the trace events and their state")
    def trace_event_get_state(name: str = "*") -> list[dict[str, Any]]:
        return [{"name": n, "state": "enabled" if ev.on else "disabled", "vcpu": False}
                for n, ev in sorted(trace.EVENTS.items()) if fnmatch.fnmatchcase(n, name)]

    @cmd("query-version", hmp="info version",
         human=lambda v: "{major}.{minor}.{micro}".format(**v["qemu"]) + v["package"],
         help="show the version of QEMU whose monitor this is")
    def query_version() -> dict[str, Any]:
        return {"qemu": dict(VERSION["qemu"]), "package": VERSION["package"]}

    @cmd(hmp="info stats", qmp=False, help="show the process's counters")
    def info_stats() -> dict[str, Any]:
        return {"process": process_stats(), **mon.stats()}

    @cmd(hmp="info history", qmp=False,
         human=lambda rows: "\n".join(f"{i}: '{line}'" for i, line in enumerate(rows)),
         help="show the command line history")
    def info_history() -> list[str]:
        return list(mon.hmp.history)

    @cmd(hmp="pdb", qmp=False, help="debug the process's loop thread with pdb on this terminal")
    def pdb_() -> None:
        raise MonitorError("pdb needs the interactive monitor (vreplica attach)")


# -- guest memory dumps (HMP x / xp) ------------------------------------------------------------


def parse_fmt(fmt: str) -> tuple[int, str, int]:
    """``/[count][format][size]``: count, format (x d u o c), size in bytes; default 1 x w."""
    body = fmt[1:]
    digits = ""
    while body and body[0].isdigit():
        digits, body = digits + body[0], body[1:]
    count = int(digits) if digits else 1
    form, size = "x", 4
    for ch in body:
        if ch in SIZES:
            size = SIZES[ch]
        elif ch in "xduoc":
            form = ch
        elif ch == "i":
            raise MonitorError("format 'i' (instructions): the replica's guest has no machine "
                               "code to disassemble", "InvalidParameter")
        else:
            raise MonitorError(f"invalid char in format: '{ch}'", "InvalidParameter")
    if form == "c":
        size = 1
    if not 1 <= count <= 4096:
        raise MonitorError("count must be 1..4096", "InvalidParameter")
    return count, form, size


def memory_dump(read: Callable[[int, int], bytes], fmt: str | None, addr: int) -> dict[str, Any]:
    """HMP's memory_dump: ``count`` units at ``addr`` read through ``read(addr, len)``."""
    count, form, size = parse_fmt(fmt) if fmt else (1, "x", 4)
    try:
        data = read(addr, count * size)
    except Exception as e:  # noqa: BLE001 - the accessor's refusal is the user's answer
        raise MonitorError(f"Cannot access memory at 0x{addr:x}: {e}") from None
    values = [int.from_bytes(data[i : i + size], "little", signed=form == "d")
              for i in range(0, len(data), size)]
    return {"addr": addr, "format": form, "size": size, "values": values, "bytes": data.hex()}


def memory_dump_text(d: dict[str, Any]) -> str:
    """The dump's lines: address, then up to 16 bytes' worth of units (8 for bytes)."""
    size, form, addr, values = d["size"], d["format"], d["addr"], d["values"]
    line_size = 8 if size == 1 else 16
    digits = {"x": size * 2, "o": (size * 8 + 2) // 3, "u": (size * 80 + 32) // 33,
              "d": (size * 80 + 32) // 33}.get(form, 0)
    lines = []
    per_line = line_size // size
    for i in range(0, len(values), per_line):
        cells = []
        for v in values[i : i + per_line]:
            if form == "x":
                cells.append(f"0x{v:0{digits}x}")
            elif form == "o":
                cells.append(f"{'0' + format(v, 'o') if v else '0':>{digits}}")
            elif form == "c":
                cells.append(_printc(v))
            else:
                cells.append(f"{v:>{digits}}")
        lines.append(f"{addr + i * size:016x}: " + " ".join(cells))
    return "\n".join(lines)


def _printc(c: int) -> str:
    special = {ord("'"): "\\'", ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r"}
    if c in special:
        return f"'{special[c]}'"
    return f"'{chr(c)}'" if 32 <= c <= 126 else f"'\\x{c:02x}'"


def register_memory_dump(mon: Monitor, read: Callable[[int, int], bytes]) -> None:
    """``xp`` and ``x`` over ``read``. The replica's guest runs with paging off, so its
    virtual addresses are its physical ones: ``x`` shows what ``xp`` shows."""

    @mon.command(hmp="xp", qmp=False, args=(FMT, Arg("addr", "int")), params="/fmt addr",
                 human=memory_dump_text,
                 help="physical memory dump starting at 'addr' (count, format x/d/u/o/c, "
                      "size b/h/w/g)")
    def xp(addr: int, fmt: str | None = None) -> dict[str, Any]:
        return memory_dump(read, fmt, addr)

    @mon.command(hmp="x", qmp=False, args=(FMT, Arg("addr", "int")), params="/fmt addr",
                 human=memory_dump_text,
                 help="virtual memory dump starting at 'addr'; the guest's mapping is the "
                      "identity (paging off), so virtual = physical, as xp")
    def x(addr: int, fmt: str | None = None) -> dict[str, Any]:
        return {**memory_dump(read, fmt, addr), "mapping": "identity"}
