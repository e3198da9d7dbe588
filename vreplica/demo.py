"""vreplica demo: what ``./run.sh`` shows a new user.

The guest sends a few UDP datagrams, one at a time, to an echo service this command opens on
127.0.0.1, paced so that each round trip travels alone; then one round trip is printed as the
call chain the three processes ran: to the host (guest driver -> KVM -> QEMU's virtio-net and
slirp -> the host socket, and the completion interrupt back) and the reply back to the guest
(slirp reads it -> virtio-net fills a guest RX buffer -> an MSI -> the guest's NAPI poll -> its
socket), with the run's summary and the files to look at next: the Chrome trace (Perfetto),
the pcap, and a swimlane picture of that round trip.

Not part of the replicated system: a guided tour of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vreplica.run.launch import execute
from vreplica.run.options import (
    Parser,
    add_device_options,
    add_run_options,
    on_off,
    options_from_args,
)
from vreplica.run.preflight import UsageError, finite_float, writable_dir, writable_file
from vreplica.run.summary import format_summary
from vreplica.run.supervisor import RunFailed, RunOptions
from vreplica.trace.render import RenderError, render_round_trip
from vreplica.trace.show import (
    KICK_HINT,
    fit,
    format_round_trip,
    format_tap_round_trip,
    pick_round_trip,
)
from vreplica.trace.tracefile import TraceError, load_trace

PICTURE = "round-trip.svg"
"""The swimlane picture's name in --out: the latest demo's, replaced by the next."""
PACKETS = 5
SIZE = 64
PACE_MS = 20.0


def _parser() -> Parser:
    p = Parser(prog="vreplica demo", label="vreplica demo",
               description="Send a few datagrams from the guest to a host echo service and "
                           "follow one round trip.")
    p.add_argument("--out", default="out", help="directory for the trace, pcap and picture")
    p.add_argument("--packets", type=int, default=PACKETS, help="datagrams to send (1..100)")
    p.add_argument("--pace-ms", type=finite_float, default=PACE_MS,
                   help="pause after each reply, so that each round trip travels alone")
    p.add_argument("--packet", type=int, default=None, metavar="SEQ",
                   help="the datagram whose round trip to follow (default: the median one)")
    p.add_argument("--netdev", choices=("user", "tap"), default="user",
                   help="tap: over a real tap in the run's namespace (root)")
    p.add_argument("--vhost", type=on_off, default=False, metavar="on|off",
                   help="with --netdev tap: vhost-net serves the rings")
    add_device_options(p)
    return p


def _run_options(a: argparse.Namespace) -> RunOptions:
    """An echo run, checked as ``vreplica run`` checks its options: the demo's options that
    the run has too (the device's properties, --packets, --pace-ms, --netdev, --vhost) mean
    the same there."""
    run = Parser(prog="vreplica demo", label="vreplica demo")
    add_run_options(run)
    r = run.parse_args([])
    for name, value in vars(a).items():
        if hasattr(r, name):
            setattr(r, name, value)
    r.mode, r.size = "echo", SIZE  # dest_port 0: execute() opens the echo service
    opts = options_from_args(r)
    if a.netdev == "tap":
        opts.extra["record_echo"] = True
    return opts


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if not 1 <= a.packets <= 100 or a.pace_ms < 0:
        print("vreplica demo: --packets must be 1..100 and --pace-ms >= 0", file=sys.stderr)
        return 2
    if a.packet is not None and not 0 <= a.packet < a.packets:
        print(f"vreplica demo: --packet must be a sequence number sent, 0..{a.packets - 1}",
              file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    tap = a.netdev == "tap"
    trace_path, pcap_path = out / "trace.json", out / "echo.pcap"
    try:
        opts = _run_options(a)
        writable_dir("--out", a.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in (trace_path, pcap_path):
            writable_file("--out", path)
    except UsageError as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"vreplica demo: --out {a.out}: {e.strerror}", file=sys.stderr)
        return 2
    opts.trace, opts.pcap = str(trace_path), str(pcap_path)
    try:
        summary, _ = execute(opts)  # dest_port 0: it opens the echo service on 127.0.0.1
    except RunFailed as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return e.code
    try:
        trace = load_trace(trace_path)
        if tap:
            seq = a.packet if a.packet is not None else a.packets // 2
            why = (f"seq {seq}, as --packet asked" if a.packet is not None else
                   f"seq {seq}: the middle one of the {a.packets} sent (--packet SEQ follows "
                   "another)")
            lines = format_tap_round_trip(trace, seq, summary.get("echo_times", {}).get(seq))
            picture = None
        else:
            seq, why = pick_round_trip(trace, a.packet)
            lines = format_round_trip(trace, seq)
            picture = render_round_trip(trace, seq, out / PICTURE)
    except (TraceError, RenderError) as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return 1

    def say(text: str, indent: int = 0) -> None:
        print("\n".join(fit(text, indent)))

    legend = next(i for i, line in enumerate(lines) if line.startswith("legend:"))
    print("\n".join(lines[:legend]))
    say(f"followed: {why}", 2)
    print("\n".join(lines[legend:]))
    if a.ioeventfd and not a.vhost:
        say(KICK_HINT, 2)
    print()
    for line in format_summary(summary).splitlines():
        say(line, 25)
    replies, bad = summary.get("replies") or 0, summary.get("bad_replies") or 0
    back = replies == a.packets and bad == 0
    say(f"  echo service           {'10.0.2.2' if tap else '127.0.0.1'}:{opts.dest_port}: "
        f"the guest got {replies} of {a.packets} replies"
        + (", payloads intact" if back else f", {bad} damaged: NOT all came back"), 25)
    print()
    cwd = Path.cwd()
    where = out.relative_to(cwd) if out.is_relative_to(cwd) else out
    say(f"files in {where}/ (each demo run replaces them):", 2)
    say(f"  {trace_path.name:<18} Chrome trace JSON: open https://ui.perfetto.dev, "
        "\"Open trace file\"", 21)
    say(f"  {pcap_path.name:<18} every frame on the NIC, both ways (wireshark, tshark -r)", 21)
    if picture is not None:
        say(f"  {picture.name:<18} seq {seq}'s round trip as a swimlane picture (open in a "
            "browser)", 21)
    return 0 if back else 1


if __name__ == "__main__":
    sys.exit(main())
