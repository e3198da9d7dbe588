"""Launching a run: the host's services it talks to, the Supervisor, and the summary; the
``run`` and ``cleanup`` commands."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vreplica.run.hostside import UdpEcho, UdpSender, UdpSink
from vreplica.run.options import options_from_args
from vreplica.run.preflight import UsageError
from vreplica.run.summary import build_summary, format_summary
from vreplica.run.supervisor import RunFailed, RunOptions, Supervisor


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def execute(opts: RunOptions, quiet: bool = False) -> tuple[dict, Supervisor]:
    """Run the replica once; returns the summary. Raises RunFailed with the one-line reason."""
    sink: UdpSink | None = None
    echo: UdpEcho | None = None
    sender: UdpSender | None = None
    sup = Supervisor(opts)
    if opts.extra.get("netdev") == "tap":
        def start_services(cfg: Any) -> None:
            """The host's services on 10.0.2.2, inside the run's namespace."""
            nonlocal sink, echo, sender
            ns = cfg.options["netns"]
            if opts.mode == "tx":
                sink = UdpSink(opts.dest_port, opts.size, ns=ns)
                opts.dest_port = cfg.options["dest_port"] = sink.port
            elif opts.mode == "echo":
                echo = UdpEcho(opts.dest_port, ns=ns, record=opts.extra.get("record_echo", False))
                opts.dest_port = cfg.options["dest_port"] = echo.port
            elif opts.mode == "sink":
                sender = UdpSender(opts.guest_port, opts.packets, opts.size, ns=ns)

        sup.before_spawn = start_services
    elif opts.mode == "tx":
        try:
            sink = UdpSink(opts.dest_port, opts.size)
            opts.dest_port = sink.port
        except OSError:
            sink = None  # the user's own listener holds the port: count slirp's sendto
    elif opts.mode == "echo" and opts.dest_port == 0:
        echo = UdpEcho(0)
        opts.dest_port = echo.port
    elif opts.mode == "sink":
        host_port, guest_port = opts.hostfwd[0]
        if host_port == 0:
            opts.hostfwd = [(free_udp_port(), guest_port)]
        sender = UdpSender(opts.hostfwd[0][0], opts.packets, opts.size)

    def on_console(role: str, line: str) -> None:
        if sender is not None and line.startswith("listening"):
            sender.start()

    sup.on_console = on_console
    try:
        cfg = sup.run()
        if sender is not None:
            sender.join(5.0)
        sink_summary = None
        if sink is not None:
            lost = 1 if opts.extra.get("guest_fault") else 0  # the frame with the fault
            sink.wait_for(opts.packets - lost, 2.0)
            sink_summary = sink.summary()
        summary = build_summary(cfg.rid, opts, sup.reports(), sink_summary,
                                sup.t_end - sup.t_start)
        if opts.reconnect:
            summary["device_restarts"] = sup.restarts
            summary["device_deaths"] = sup.deaths
        if opts.trace:
            from vreplica.trace.tracefile import merge_traces

            merge_traces(sup.trace_pieces(), opts.trace)
            summary["trace"] = opts.trace
        if opts.pcap:
            summary["pcap"] = opts.pcap
        if echo is not None and echo.record:  # the demo shows when the host's socket had it
            summary["echo_times"] = dict(echo.times)
        return summary, sup
    finally:
        for helper in (sink, echo):
            if helper is not None:
                helper.close()
        sup.cleanup()


def cmd_run(a: argparse.Namespace) -> int:
    if a.guest_fault == "list":
        from guestproc.faults import fault_kinds

        for name, text in fault_kinds():
            print(f"{name:18} {text}")
        return 0
    if a.trace_events == "help":
        from vreplica.trace.events import format_help

        print(format_help())
        return 0
    opts = options_from_args(a)
    summary, _ = execute(opts)
    print(format_summary(summary))
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


def cmd_cleanup(a: argparse.Namespace) -> int:
    from common.ipc import cleanup_dead_runs

    removed = cleanup_dead_runs()
    print(f"removed the leftovers of {len(removed)} dead run(s)"
          + (f": {', '.join(removed)}" if removed else ""))
    return 0


def reported(label: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status; a UsageError or a RunFailed is its one line on stderr,
    naming ``label``, and status 2 or the run's own."""
    try:
        return body()
    except UsageError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"{label}: {e}", file=sys.stderr)
        return e.code
