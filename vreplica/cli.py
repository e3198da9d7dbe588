"""vreplica: the command line, dispatch only. ``./run.sh ARGS`` is ``vreplica ARGS``."""

from __future__ import annotations

import sys

from vreplica.run.launch import cmd_cleanup, cmd_run, reported
from vreplica.run.options import Parser, add_run_options
from vreplica.run.preflight import UsageError
from vreplica.run.supervisor import Terminated, catch_sigterm

DELEGATED = {
    "demo": ("vreplica.demo", "main", "one packet's journey through the three processes"),
    "trace": ("vreplica.trace.render", "main",
              "trace files: render TRACE.json OUT.svg|OUT.png; show TRACE.json "
              "[--packet SEQ]; compare REAL.log REPLICA"),
    "bench": ("vreplica.bench.command", "main", "measure the path against its baselines"),
    "stress": ("vreplica.stress.stress", "main", "sustained load with chaos, and a verdict"),
    "ps": ("vreplica.monitor_client", "ps_main", "the running replicas and their processes"),
    "attach": ("vreplica.monitor_client", "attach_main", "a monitor prompt in one process"),
    "fuzz": ("vreplica.fuzz.command", "main", "fuzz the device's ring handling"),
    "vhost-user-bridge": ("vhostuserproc.__main__", "main",
                          "the vhost-user backend alone, for any front-end"),
}
"""Subcommands whose implementation, and own argument parsing, live in another module."""


def run_delegated(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = DELEGATED[name]
    return getattr(importlib.import_module(module), func)(argv)


def build_parser() -> Parser:
    p = Parser(prog="vreplica", description="A KVM guest's virtio-net path, as three processes.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    r = sub.add_parser("run", help="run the replica once and print its summary")
    add_run_options(r)
    r.set_defaults(func=cmd_run)
    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    c = sub.add_parser("cleanup", help="remove IPC objects left by dead runs")
    c.set_defaults(func=cmd_cleanup)
    return p


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])
    if argv and argv[0] == "run":  # QEMU's own options (-device, -netdev, -trace, -S, -m)
        from vreplica.run.qemu_opts import QemuHelp, QemuOptsError, qemu_options

        try:
            argv = ["run", *qemu_options(argv[1:])]
        except QemuHelp as h:
            print(h)
            return 0
        except QemuOptsError as e:
            raise UsageError(str(e)) from None
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """``argv`` None: the program itself, whose SIGTERM ends it as QEMU's does."""
    if argv is None:
        catch_sigterm()
        argv = sys.argv[1:]
    try:
        return reported("vreplica", lambda: _dispatch(argv))
    except Terminated as e:  # outside a run (or in another command), as inside: 128 + 15
        print(f"vreplica: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # a Ctrl-C outside a run (execute() turns its own into RunFailed)
        print("vreplica: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
