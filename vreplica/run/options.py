"""The run's options: ``vreplica run``'s arguments, each checked against its rule, and the
RunOptions they make."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from common.inet import UDP_MAX_PAYLOAD
from common.vring import is_power_of_2, vring_size
from vreplica.run.preflight import UsageError, finite_float, udp_port_free, writable_file
from vreplica.run.supervisor import RunOptions

MAX_QUEUE_SIZE = 32768


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help gives each option's default after its help ("default: 10"; on|off options as
    on or off); an option with no default, or whose help tells it, gets none added."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, "") or default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, argparse._StoreConstAction)  # store_true and the like
                or "default" in text):
            return text
        shown = ("on" if default else "off") if isinstance(default, bool) else str(default)
        return f"{text} (default: {shown})".lstrip()


class Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr, naming the program (``label``), and exit status 2.
    --help shows every option's default."""

    def __init__(self, *args: Any, label: str = "vreplica", **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.label = label

    def error(self, message: str) -> NoReturn:
        print(f"{self.label}: {message}", file=sys.stderr)
        sys.exit(2)


def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="tx",
                   help="tx: send to a host socket; echo: to an echo service, count replies; "
                        "sink: receive from the host through --hostfwd; ping: ICMP to 10.0.2.2")
    p.add_argument("--hostfwd", metavar="udp::HOSTPORT-:GUESTPORT",
                   help="forward a host UDP port on 127.0.0.1 to the guest (sink mode)")
    p.add_argument("--window", type=int, default=1, help="echo: datagrams in flight at once")
    p.add_argument("--queues", type=int, default=1,
                   help="virtio-net queue pairs (VIRTIO_NET_F_MQ with a control queue if > 1)")
    p.add_argument("--packets", type=int, default=10, help="datagrams the guest sends")
    p.add_argument("--size", type=int, default=64, help="UDP payload bytes (8..1472)")
    p.add_argument("--dest-port", type=int, default=0,
                   help="host UDP port on 127.0.0.1 (0: a sink of the run's own)")
    p.add_argument("--pace-ms", type=finite_float, default=0.0,
                   help="guest sleeps between datagrams")
    p.add_argument("--phases", metavar="N[@MS],...",
                   help="send in phases, a second apart: N datagrams each, MS apart (none: "
                        "back to back); e.g. 1,5@300,20 is the recorded QEMU run's warm-up, "
                        "5 spaced 300 ms apart and a burst of 20 (sets --packets)")
    p.add_argument("--batch", type=int, default=1, help="datagrams per xmit_more batch")
    p.add_argument("--mem", type=str, default="16M", help="guest RAM")
    add_device_options(p)
    p.add_argument("--guest-fault", metavar="KIND",
                   help="the guest driver breaks one ring rule after 5 good frames and "
                        "recovers by reset ('list' shows the kinds)")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome trace (Perfetto) here")
    p.add_argument("--trace-events", metavar="GLOB,...",
                   help="with --trace: only these trace events start on ('spans' for the "
                        "function spans), as QEMU's -trace enable=PATTERN; 'help' lists them")
    p.add_argument("--pcap", metavar="FILE", help="write every frame on the NIC here")
    p.add_argument("--summary-json", metavar="FILE", help="write the summary here, as JSON")
    p.add_argument("--timeout", type=finite_float, default=60.0,
                   help="seconds without progress (the guest's datagrams sent or received) "
                        "before the run gives up; the guest's own waits for replies give up "
                        "after as long, the supervisor 15 s later")
    p.add_argument("--poll-us", type=finite_float, default=0.0, metavar="US",
                   help="the replica's own (vhost-net's poll-us, not a QEMU option): the TX "
                        "bottom half busy-polls the ring this long before it turns kicks "
                        "back on")
    p.add_argument("--udp-expire", type=finite_float, default=240.0, help=argparse.SUPPRESS)
    p.add_argument("--net-queue-len", type=int, default=10000, help=argparse.SUPPRESS)
    p.add_argument("--rx-stall-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rx-stall-ms", type=finite_float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--wait-attach", action="store_true",
                   help="hold the vCPU before its first instruction until 'cont' (QEMU's -S)")
    p.add_argument("--hold", action="store_true",
                   help="keep the processes up after the program ends, until 'quit' or Ctrl-C")
    p.add_argument("--reconnect", action="store_true",
                   help="if QEMU dies, start a new one on the same guest (the guest and KVM go on)")
    add_tap_options(p)


def add_device_options(p: argparse.ArgumentParser) -> list[str]:
    """The virtio-net-pci device's properties (QEMU's -device virtio-net-pci,...), which
    ``vreplica demo`` takes too; returns their destinations."""
    return [a.dest for a in (
        p.add_argument("--queue-size", type=int, default=256, help="virtqueue size (power of 2)"),
        p.add_argument("--vectors", type=int, default=None,
                       help="MSI-X: 0 = INTx, 1 = one shared vector, N = one per queue "
                            "(default: one per queue, the config's and the control queue's)"),
        p.add_argument("--ioeventfd", type=on_off, default=True, metavar="on|off",
                       help="KVM signals an eventfd for the guest's kick, the vCPU goes on "
                            "(off: the kick exits to QEMU's vCPU thread)"),
        p.add_argument("--event-idx", type=on_off, default=True, metavar="on|off",
                       help="VIRTIO_RING_F_EVENT_IDX: kicks and interrupts suppressed by index"),
        p.add_argument("--mrg-rxbuf", type=on_off, default=False, metavar="on|off",
                       help="VIRTIO_NET_F_MRG_RXBUF: a received frame may span RX buffers"),
        p.add_argument("--any-layout", type=on_off, default=True, metavar="on|off",
                       help="off: TX puts the virtio-net header in a buffer of its own"),
        p.add_argument("--indirect-desc", type=on_off, default=True, metavar="on|off",
                       help="VIRTIO_RING_F_INDIRECT_DESC (used by chains of 2+ buffers)"),
        p.add_argument("--tx", choices=("bh", "timer"), default="bh",
                       help="how QEMU defers TX work after a kick: a bottom half or a timer"),
        p.add_argument("--tx-burst", type=int, default=256,
                       help="frames QEMU sends per TX pass before it yields (x-txburst)"),
        p.add_argument("--tx-timer-ns", type=int, default=150_000, metavar="NS",
                       help="--tx timer: the TX timer's delay (QEMU's x-txtimer)"),
        p.add_argument("--ring", choices=RINGS, default="split",
                       help="virtqueue layout: split, or packed (virtio 1.1's "
                            "VIRTIO_F_RING_PACKED, QEMU's packed=on; needs a modern transport)"),
        p.add_argument("--transport", choices=TRANSPORTS, default="legacy",
                       help="virtio-pci interface: legacy (I/O BAR, the seed's path), modern "
                            "(virtio 1.0: capabilities, MMIO notify) or transitional (both; "
                            "the guest picks modern), as QEMU's disable-legacy/disable-modern"),
    )]


RINGS = ("split", "packed")


def check_ring(a: argparse.Namespace) -> None:
    """VIRTIO_F_RING_PACKED is a feature bit above 31: only a virtio 1.0 device offers it.
    (With --vhost on QEMU takes it back from the device, as vhost-net does not offer it: the
    guest gets a split ring, as with QEMU's packed=on,vhost=on.)"""
    if a.ring != "packed":
        return
    if a.transport == "legacy":
        raise UsageError("--ring packed needs --transport modern or transitional "
                         "(VIRTIO_F_RING_PACKED needs VIRTIO_F_VERSION_1)")


TRANSPORTS = ("legacy", "modern", "transitional")


# -- -netdev tap ---------------------------------------------------------------------------------

TAP_GUEST_PORT = 5555
"""--mode sink over a tap: the guest's port the host's sender sends to (no hostfwd needed)."""


def add_tap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--netdev", choices=("user", "tap", "vhost-user"), default="user",
                   help="user: slirp to 127.0.0.1; tap: a real tap in the run's own network "
                        "namespace, host end 10.0.2.2 (needs root); vhost-user: a vhost-user "
                        "back end serves the rings (the replica's own, or --chardev's)")
    p.add_argument("--chardev", metavar="id=ID,path=SOCK[,server=on][,reconnect=S]",
                   help="vhost-user: the socket QEMU's front-end talks through (-chardev "
                        "socket,...)")
    p.add_argument("--static-arp", action="store_true",
                   help="the guest knows 10.0.2.2's MAC (52:55:0a:00:02:02) and sends no ARP")
    p.add_argument("--vhost", type=on_off, default=False, metavar="on|off",
                   help="tap: vhost-net in the KVM process serves the rings (-netdev "
                        "tap,vhost=on); --poll-us becomes its busy-poll timeout")
    p.add_argument("--csum", type=on_off, default=True, metavar="on|off",
                   help="tap: offer VIRTIO_NET_F_CSUM/GUEST_CSUM (checksums in the vnet header)")
    p.add_argument("--tap-sndbuf", type=int, default=0, metavar="BYTES",
                   help="tap: the tap's send buffer (TUNSETSNDBUF; 0: unlimited, QEMU's default)")
    p.add_argument("--tap-rate", metavar="RATE",
                   help="tap: the host drains the guest's frames through a token-bucket qdisc "
                        "at RATE (tc's units, e.g. 2mbit); with --tap-sndbuf the tap's write "
                        "would block and the device parks frames in async_tx")


TC_RATE_RE = r"[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit|bps|kbps|mbps)"


def tap_options(a: argparse.Namespace) -> dict[str, Any]:
    """Check the tap options; what they put in RunOptions.extra."""
    import re

    arp = {"arp": False} if a.static_arp else {}
    if a.netdev == "vhost-user":
        return {**arp, **vhost_user_options(a)}
    if a.chardev:
        raise UsageError("--chardev needs --netdev vhost-user")
    if a.netdev != "tap":
        if a.tap_sndbuf or a.tap_rate or a.vhost:
            raise UsageError("--tap-sndbuf, --tap-rate and --vhost need --netdev tap")
        return arp
    from common.netns import privilege_problem

    why = privilege_problem()
    if why:
        raise UsageError(f"--netdev tap {why}")
    if a.hostfwd:
        raise UsageError("--hostfwd is slirp's; over a tap the host reaches 10.0.2.15 directly")
    if a.tap_sndbuf < 0:
        raise UsageError("--tap-sndbuf must be >= 0")
    if a.tap_rate is not None and not re.fullmatch(TC_RATE_RE, a.tap_rate):
        raise UsageError(f"--tap-rate {a.tap_rate!r}: expected a rate such as 2mbit")
    if a.vhost and not a.ioeventfd:
        raise UsageError("--vhost on needs --ioeventfd on: vhost takes the queues' host "
                         "notifiers (QEMU: 'binding does not support host notifiers')")
    return {**arp, "netdev": "tap", "csum": a.csum, "tap_sndbuf": a.tap_sndbuf,
            "tap_backpressure": a.tap_rate, "vhost": a.vhost}


def vhost_user_options(a: argparse.Namespace) -> dict[str, Any]:
    """-netdev vhost-user: the chardev's socket must be reachable (a client's) or makeable (a
    server's) before anything starts; without one, the replica's own back end (a fourth
    process) gives at most VHOST_USER_BRIDGE_MAX_QUEUES / 2 pairs."""
    import os
    import stat

    from vreplica.run.qemu_opts import qemu_opts_parse

    if a.tap_sndbuf or a.tap_rate or a.vhost:
        raise UsageError("--tap-sndbuf, --tap-rate and --vhost need --netdev tap")
    if not a.ioeventfd:
        raise UsageError("--netdev vhost-user needs --ioeventfd on: the back end takes the "
                         "queues' host notifiers")
    if not a.chardev:
        from vhostuserproc.__main__ import VHOST_USER_BRIDGE_MAX_QUEUES

        if a.queues > VHOST_USER_BRIDGE_MAX_QUEUES // 2:
            raise UsageError(f"--queues {a.queues}: the vhost-user backend gives 1 to "
                             f"{VHOST_USER_BRIDGE_MAX_QUEUES // 2} queue pairs")
        return {"netdev": "vhost-user", "csum": a.csum}
    spec: dict[str, Any] = {"id": "c0", "server": False, "wait": True, "reconnect": 0}
    for key, value in qemu_opts_parse(a.chardev):
        if key in ("server", "wait"):
            spec[key] = value == "on"
        elif key == "reconnect":
            spec[key] = int(value) if value.isdigit() else 0
        elif key in ("id", "path"):
            spec[key] = value
        else:
            raise UsageError(f"--chardev: Invalid parameter '{key}'")
    path = spec.get("path")
    if not path:
        raise UsageError("--chardev: no socket path (path=SOCK)")
    path = spec["path"] = os.path.abspath(path)
    if spec["server"]:
        d = os.path.dirname(path)
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise UsageError(f"--chardev path={path}: cannot make a socket there")
    else:
        try:
            st = os.stat(path)
        except OSError as e:
            raise UsageError(f"--chardev path={path}: Failed to connect to '{path}': "
                             f"{e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"--chardev path={path}: not a socket")
    return {"netdev": "vhost-user", "chardev": spec, "csum": a.csum}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise UsageError(f"--mem: {text!r} is not a size (e.g. 16M)") from None


MODES = ("tx", "echo", "sink", "ping")


def parse_hostfwd(text: str) -> tuple[int, int]:
    """QEMU's hostfwd=udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, UDP on loopback only."""
    try:
        proto, rest = text.split(":", 1)
        host, guest = rest.split("-", 1)
        host_addr, host_port = host.rsplit(":", 1)
        guest_addr, guest_port = guest.rsplit(":", 1)
        hp, gp = int(host_port), int(guest_port)
    except ValueError:
        raise UsageError(f"--hostfwd {text!r}: expected udp::HOSTPORT-:GUESTPORT") from None
    if proto != "udp":
        raise UsageError("--hostfwd: only udp forwarding is supported")
    if host_addr not in ("", "127.0.0.1") or guest_addr not in ("", "10.0.2.15"):
        raise UsageError("--hostfwd: the host side is 127.0.0.1 and the guest 10.0.2.15")
    if not (0 <= hp <= 65535 and 1 <= gp <= 65535):
        raise UsageError("--hostfwd: ports must be 1..65535 (host port 0: pick a free one)")
    return hp, gp


MAX_PHASES = 16


def parse_phases(text: str) -> list[list[float]]:
    """``--phases N[@MS],...``: [count, gap in ms] per phase."""
    out: list[list[float]] = []
    for part in text.split(","):
        count, _, gap = part.strip().partition("@")
        try:
            n, ms = int(count), float(gap) if gap else 0.0
        except ValueError:
            raise UsageError(f"--phases {text!r}: expected N[@MS],... "
                             "(e.g. 1,5@300,20)") from None
        if not 1 <= n <= 100_000 or not 0 <= ms <= 60_000:
            raise UsageError("--phases: each phase sends 1..100000 datagrams, 0..60000 ms apart")
        out.append([n, ms])
    if len(out) > MAX_PHASES:
        raise UsageError(f"--phases: at most {MAX_PHASES} phases")
    return out


def options_from_args(a: argparse.Namespace) -> RunOptions:
    """Check every option against its rule; the first broken rule is the error."""
    if a.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    tap = tap_options(a)
    phases = parse_phases(a.phases) if a.phases is not None else None
    if phases is not None:
        if a.mode != "tx" or a.pace_ms or a.batch != 1 or a.guest_fault:
            raise UsageError("--phases goes with --mode tx, without --pace-ms, --batch or "
                             "--guest-fault")
        a.packets = int(sum(n for n, _ in phases))
    hostfwd = [parse_hostfwd(a.hostfwd)] if a.hostfwd else []
    if a.mode == "sink" and not hostfwd and not tap:
        raise UsageError("--mode sink needs --hostfwd udp::HOSTPORT-:GUESTPORT")
    if not 1 <= a.window <= 256:
        raise UsageError("--window must be between 1 and 256")
    if not 1 <= a.queues <= 8:
        raise UsageError("--queues must be between 1 and 8")
    if not 0 <= a.poll_us <= 10_000:
        raise UsageError("--poll-us must be between 0 and 10000")
    if a.udp_expire <= 0 or a.net_queue_len < 1:
        raise UsageError("--udp-expire must be positive and --net-queue-len at least 1")
    if not 1 <= a.packets <= 10_000_000:
        raise UsageError("--packets must be between 1 and 10000000")
    if not 8 <= a.size <= UDP_MAX_PAYLOAD:
        raise UsageError(f"--size must be between 8 and {UDP_MAX_PAYLOAD} "
                         "(the 8-byte sequence number, at most the 1500-byte MTU)")
    if not 0 <= a.dest_port <= 65535:
        raise UsageError("--dest-port must be a port number, 1..65535 (0: the run's own sink)")
    if not is_power_of_2(a.queue_size) or a.queue_size > MAX_QUEUE_SIZE:
        raise UsageError(f"--queue-size must be a power of 2 no larger than {MAX_QUEUE_SIZE}")
    mem = parse_size(a.mem)
    need = 2 * vring_size(a.queue_size, 4096) + (3 * a.queue_size + 64) * 2048 + (1 << 20)
    if mem < need:
        raise UsageError(f"--mem {a.mem} is too small for two rings of {a.queue_size} and "
                         f"their buffers (needs at least {-(-need >> 20)} MiB)")
    if mem > 1 << 30:
        raise UsageError("--mem must be at most 1G")
    if a.vectors is not None and not 0 <= a.vectors <= 64:
        raise UsageError("--vectors must be between 0 and 64")
    if not 1 <= a.tx_burst <= 4096:
        raise UsageError("--tx-burst must be between 1 and 4096")
    if not 1_000 <= a.tx_timer_ns <= 1_000_000_000:
        raise UsageError("--tx-timer-ns must be between 1000 and 1000000000")
    if a.pace_ms < 0 or a.batch < 1:
        raise UsageError("--pace-ms must be >= 0 and --batch >= 1")
    if a.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if a.trace_events is not None:
        check_trace_events(a.trace_events)
        if not a.trace:
            raise UsageError("--trace-events needs --trace FILE")
    if a.guest_fault is not None:
        from guestproc.faults import FAULT_AFTER, FAULTS

        if a.guest_fault not in FAULTS:
            raise UsageError(f"--guest-fault: no kind {a.guest_fault!r} "
                             "(--guest-fault list shows them)")
        if a.mode not in ("tx", "ping"):
            raise UsageError("--guest-fault works with --mode tx or ping (the frame that "
                             "carries the fault is lost; an echo client would wait for it)")
        if a.packets <= FAULT_AFTER:
            raise UsageError(f"--guest-fault needs --packets above {FAULT_AFTER} "
                             f"(the fault rides on the frame after {FAULT_AFTER} good ones)")
        check_fault_transport(a.guest_fault, a.transport)
        check_fault_ring(a.guest_fault, a.ring)
    check_ring(a)
    check_outputs(a, hostfwd)
    return RunOptions(mode=a.mode, hostfwd=hostfwd, window=a.window, queues=a.queues,
                      guest_port=hostfwd[0][1] if hostfwd else
                      (TAP_GUEST_PORT if tap and a.mode == "sink" else 0),
                      udp_expire_s=a.udp_expire,
                      packets=a.packets, size=a.size, dest_port=a.dest_port,
                      pace_ms=a.pace_ms, batch=a.batch, mem=mem, queue_size=a.queue_size,
                      vectors=a.vectors, ioeventfd=a.ioeventfd, event_idx=a.event_idx,
                      mrg_rxbuf=a.mrg_rxbuf, tx=a.tx, tx_burst=a.tx_burst, trace=a.trace,
                      trace_events=a.trace_events, pcap=a.pcap, timeout=a.timeout,
                      reconnect=a.reconnect,
                      extra={"wait_attach": a.wait_attach, "hold": a.hold,
                             "netqueue_maxlen": a.net_queue_len,
                             "poll_us": a.poll_us,
                             "rx_stall_after": a.rx_stall_after, "rx_stall_ms": a.rx_stall_ms,
                             "any_layout": a.any_layout, "indirect_desc": a.indirect_desc,
                             "guest_fault": a.guest_fault, "phases": phases,
                             "tx_timer_ns": a.tx_timer_ns, "ring": a.ring,
                             "transport": a.transport, **tap})


def check_fault_ring(kind: str, ring: str) -> None:
    """A fault that writes ring entries writes one layout's."""
    from guestproc.faults import FAULTS

    needs = FAULTS[kind].ring
    if needs is not None and ring != needs:
        raise UsageError(f"--guest-fault {kind} writes a {needs} ring: it needs --ring {needs}")


def check_fault_transport(kind: str, transport: str) -> None:
    """A fault written through one interface's registers needs a device that has them
    (a transitional device has both)."""
    from guestproc.faults import FAULTS

    needs = FAULTS[kind].transport
    if needs is not None and transport not in (needs, "transitional"):
        raise UsageError(f"--guest-fault {kind} writes {needs} registers: it needs "
                         f"--transport {needs} or transitional")


def check_trace_events(text: str) -> None:
    """Every pattern of ``--trace-events`` selects an event (or the spans)."""
    from vreplica.trace.events import unmatched_patterns

    patterns = [p for p in text.split(",") if p]  # as common.trace.SELECTED reads them
    if not patterns:
        raise UsageError("--trace-events: no event named (--trace-events help lists them)")
    bad = unmatched_patterns(patterns)
    if bad:
        raise UsageError(f"--trace-events: {', '.join(map(repr, bad))} "
                         f"match{'es' if len(bad) == 1 else ''} no trace event "
                         "(--trace-events help lists them)")


def check_outputs(a: argparse.Namespace, hostfwd: list[tuple[int, int]]) -> None:
    """The files the run writes can be written, each its own, and the host ports it binds
    are free."""
    seen: dict[Path, str] = {}
    for option, path in (("--trace", a.trace), ("--pcap", a.pcap),
                         ("--summary-json", a.summary_json)):
        if path:
            writable_file(option, path)
            other = seen.setdefault(Path(path).resolve(), option)
            if other != option:
                raise UsageError(f"{option} {path}: the file {other} writes too")
    for host_port, _ in hostfwd:
        udp_port_free("--hostfwd", host_port)
