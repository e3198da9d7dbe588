"""vreplica demo --peer dpdk: a ping's round trip through the replica's guest, KVM and QEMU
(the vhost-user front-end) and a real DPDK back end, dpdk-testpmd's vhost library in
icmpecho mode.

The guest pings 10.0.2.2 with testpmd on the other end of the rings; one request and its
reply are printed as the chain the processes ran: the guest's driver adds the frame and
notifies, KVM's ioeventfd signals the eventfd testpmd polls, testpmd dequeues, answers and
enqueues (rte_vhost_dequeue_burst, icmpecho's reply_to_icmp_echo_rqsts,
rte_vhost_enqueue_burst) and writes the call eventfd, KVM's irqfd injects the interrupt and
the guest's NAPI poll takes the reply. Then testpmd's port counters beside the guest's.

Not part of the replicated system: a guided tour of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from vreplica.run.launch import execute
from vreplica.run.options import Parser, add_run_options, options_from_args
from vreplica.run.preflight import UsageError, writable_dir, writable_file
from vreplica.run.supervisor import RunFailed, RunOptions

PROMPT = b"testpmd> "
START_TIMEOUT_S = 60.0
ARP_FRAME_LEN = 42
PR_SET_PDEATHSIG = 1
WIDTH = 98


def _own_session_dying_with_us() -> None:
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Testpmd:
    """``dpdk-testpmd --vdev net_vhost0,iface=SOCK -- -i --forward-mode=icmpecho``, driven
    over its interactive prompt; a process group of its own that ``stop`` always kills."""

    def __init__(self, sock: Path) -> None:
        self.prefix = f"vnr-demo-{uuid.uuid4().hex[:10]}"
        args = ["dpdk-testpmd", "--no-huge", "-m", "1024", "--no-pci", "-l", "0-1",
                f"--file-prefix={self.prefix}", "--vdev", f"net_vhost0,iface={sock}", "--",
                "-i", "--nb-cores=1", "--total-num-mbufs=4096", "--forward-mode=icmpecho"]
        self.master, slave = pty.openpty()  # a terminal, so testpmd's stdout is line-buffered
        try:
            self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                                         preexec_fn=_own_session_dying_with_us)
        finally:
            os.close(slave)
        self.output = b""

    def _until_prompt(self, timeout: float) -> str:
        """What testpmd prints up to its next prompt."""
        fd = self.master
        deadline = time.monotonic() + timeout
        start = len(self.output)
        while not self.output[start:].endswith(PROMPT):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            try:
                chunk = os.read(fd, 65536) if ready else b""
            except OSError:  # EIO: the terminal's other end closed
                chunk = b""
            if not chunk:
                tail = self.output.decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError("dpdk-testpmd " + ("timed out" if not ready else "exited")
                                   + (": " + " / ".join(tail) if tail else ""))
            self.output += chunk
        return self.output[start:].decode(errors="replace")

    def cmd(self, line: str, timeout: float = 20.0) -> str:
        os.write(self.master, line.encode() + b"\n")
        return self._until_prompt(timeout)

    def start(self) -> None:
        self._until_prompt(START_TIMEOUT_S)
        self.cmd("start")

    def port_stats(self) -> dict[str, int]:
        out = self.cmd("show port stats 0")
        found = {k: int(v) for k, v in re.findall(r"(RX-packets|TX-packets):\s+(\d+)", out)}
        return {"rx": found.get("RX-packets", -1), "tx": found.get("TX-packets", -1)}

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if self.proc.poll() is None:
                os.write(self.master, b"quit\n")
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)
        shutil.rmtree(Path("/var/run/dpdk") / self.prefix, ignore_errors=True)


# -- the round trip from the trace ------------------------------------------------------------

GUEST_OUT = ("net_dev_xmit", "start_xmit", "virtqueue_add_split", "virtqueue_kick_prepare")
KVM_KICK = ("kvm_exit", "kvm_pio", "ioeventfd_write")
KVM_CALL = ("irqfd_wakeup", "kvm_msi_set_irq", "kvm_inj_virq")
GUEST_IN = ("irq_handler_entry", "vring_interrupt", "skb_recv_done", "napi_poll",
            "receive_buf", "netif_receive_skb", "ip_rcv")
WHAT = {
    "net_dev_xmit": "the echo request leaves the stack",
    "start_xmit": "virtio-net's ndo_start_xmit",
    "virtqueue_add_split": "the frame's descriptors into the avail ring",
    "virtqueue_kick_prepare": "does the device want a notification?",
    "vp_notify": "write the queue index to the notify register",
    "kvm_exit": "the write traps",
    "kvm_pio": "the notify port",
    "ioeventfd_write": "matched an ioeventfd: signal its eventfd (testpmd polls it)",
    "irqfd_wakeup": "testpmd wrote the call eventfd: the irqfd fires",
    "kvm_msi_set_irq": "the queue's MSI-X message",
    "kvm_inj_virq": "the vector into the vCPU",
    "irq_handler_entry": "the guest's handler for the receive queue",
    "vring_interrupt": "used ring has new entries",
    "skb_recv_done": "schedule NAPI",
    "napi_poll": "virtnet_poll",
    "receive_buf": "the echo reply out of the receive buffer",
    "netif_receive_skb": "up the stack",
    "ip_rcv": "IPv4: ICMP echo reply to ping",
}


def _events(trace_path: Path) -> tuple[list[dict[str, Any]], dict[int, str]]:
    data = json.loads(trace_path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    roles = {e["pid"]: e["args"]["name"].split()[0] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    timed = sorted((e for e in events if "ts" in e and e.get("ph") in ("i", "X", "B")),
                   key=lambda e: e["ts"])
    return timed, roles


def _first(events: list[dict[str, Any]], name: str, after: float,
           role_pid: int | None = None, pred: Any = None) -> dict[str, Any] | None:
    """The first trace point (else span) named `name` from `after` on."""
    span = None
    for e in events:
        if e["ts"] >= after and e.get("name") == name \
                and (role_pid is None or e.get("pid") == role_pid) \
                and (pred is None or pred(e.get("args") or {})):
            if e.get("ph") == "i":
                return e
            span = span or e
    return span


def _last(events: list[dict[str, Any]], name: str, before: float,
          pred: Any = None) -> dict[str, Any] | None:
    found = None
    for e in events:
        if e["ts"] > before:
            break
        if e.get("name") == name and (pred is None or pred(e.get("args") or {})):
            found = e
    return found


def format_ping_round_trip(trace_path: Path, which: int | None) -> tuple[list[str], int]:
    """One echo request's way out and its reply's way back; (lines, request number)."""
    events, roles = _events(trace_path)
    guest = next((p for p, r in roles.items() if r == "guest"), None)
    requests = [e for e in events if e.get("name") == "net_dev_xmit" and e.get("pid") == guest
                and (e.get("args") or {}).get("len") != ARP_FRAME_LEN]
    if not requests:
        raise ValueError("the trace holds no echo request")
    k = which if which is not None and which < len(requests) else len(requests) // 2
    t0 = requests[k]["ts"]
    chain: list[dict[str, Any]] = [requests[k]]
    t = t0
    for name in GUEST_OUT[1:]:
        e = _first(events, name, t, guest)
        if e is not None:
            chain.append(e)
            t = e["ts"]
    kicked = bool((chain[-1].get("args") or {}).get("needs_kick"))
    if kicked:
        for name in ("vp_notify", *KVM_KICK):
            e = _first(events, name, t)
            if e is not None:
                chain.append(e)
                t = e["ts"]
    kick_ts = t
    irq = _first(events, "irq_handler_entry", kick_ts, guest,
                 lambda a: "input" in str(a.get("name", "")))
    if irq is None:
        raise ValueError("the trace holds no receive interrupt after the request")
    vector = (irq.get("args") or {}).get("irq")
    inj = _last(events, "kvm_inj_virq", irq["ts"], lambda a: a.get("irq") == vector)
    msi = _last(events, "kvm_msi_set_irq", inj["ts"] if inj else irq["ts"],
                lambda a: a.get("data") == vector)
    wake = _last(events, "irqfd_wakeup", msi["ts"] if msi else irq["ts"])
    testpmd_at = len(chain)
    chain += [e for e in (wake, msi, inj) if e is not None]
    chain.append(irq)
    t = irq["ts"]
    for name in GUEST_IN[1:]:
        e = _first(events, name, t, guest)
        if e is not None:
            chain.append(e)
            t = e["ts"]
    lines = [f"echo request {k}: the guest -> KVM -> DPDK testpmd -> KVM -> the guest", ""]
    for i, e in enumerate(chain):
        if i == testpmd_at:
            gap = (e["ts"] - kick_ts) if chain else 0
            how = ("takes the kick" if kicked else
                   "busy-polls the avail ring, so the guest was told not to kick")
            lines += [
                f"{'':>10}  {'testpmd':<8} rte_vhost_dequeue_burst -> reply_to_icmp_echo_rqsts "
                "-> rte_vhost_enqueue_burst",
                f"{'':>10}  {'':<8} (DPDK 22.11 lib/vhost in its own process {how}; "
                f"{gap:.0f} us to the call)"]
        args = e.get("args") or {}
        detail = ", ".join(f"{k2} {v}" for k2, v in args.items()
                           if k2 in ("len", "port", "addr", "irq", "name", "data", "head",
                                     "avail_idx", "needs_kick"))
        lines.append(f"{e['ts'] - t0:>8.0f}us  {roles.get(e['pid'], '?'):<8} "
                     f"{e['name']:<24} {WHAT.get(e['name'], '')}"
                     + (f" ({detail})" if detail else ""))
    return lines, k


# -- the command --------------------------------------------------------------------------------

def _run_options(a: argparse.Namespace, sock: Path, trace: Path) -> RunOptions:
    run = Parser(prog="vreplica demo", label="vreplica demo")
    add_run_options(run)
    r = run.parse_args([])
    for name, value in vars(a).items():
        if hasattr(r, name) and name not in ("netdev", "vhost"):
            setattr(r, name, value)
    r.mode, r.netdev, r.chardev = "ping", "vhost-user", f"id=c0,path={sock}"
    opts = options_from_args(r)
    opts.trace = str(trace)
    return opts


def main(a: argparse.Namespace) -> int:
    """The demo with testpmd as the back end; a.* are the demo's parsed options."""
    if a.netdev != "user" or a.vhost:
        print("vreplica demo: --peer dpdk takes the place of --netdev and --vhost",
              file=sys.stderr)
        return 2
    if shutil.which("dpdk-testpmd") is None:
        print("vreplica demo: --peer dpdk needs dpdk-testpmd (scripts/setup-peers.sh installs "
              "it)", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    trace_path = out / "trace.json"
    try:
        writable_dir("--out", a.out)
        out.mkdir(parents=True, exist_ok=True)
        writable_file("--out", trace_path)
    except UsageError as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return 2
    private = Path(tempfile.mkdtemp(prefix="vnr-dpdk-"))
    sock = private / "vhost-user.sock"
    testpmd = Testpmd(sock)
    try:
        try:
            testpmd.start()
            opts = _run_options(a, sock, trace_path)
        except UsageError as e:
            print(f"vreplica demo: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"vreplica demo: {e}", file=sys.stderr)
            return 1
        try:
            summary, _ = execute(opts)
        except RunFailed as e:
            print(f"vreplica demo: {e}", file=sys.stderr)
            return e.code
        port = testpmd.port_stats()
    finally:
        testpmd.stop()
        shutil.rmtree(private, ignore_errors=True)
    try:
        lines, k = format_ping_round_trip(trace_path, a.packet)
    except (ValueError, OSError, KeyError) as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    vu = summary.get("vhost_user") or {}
    g_tx, g_rx = sum(vu.get("guest_tx_frames") or [0]), sum(vu.get("guest_rx_frames") or [0])
    replies = summary.get("delivered") or 0
    print()
    print(f"  the guest              sent {g_tx} frames, got {g_rx}; {replies} of "
          f"{a.packets} echo replies")
    print(f"  testpmd (port 0)       received {port['rx']}, sent {port['tx']}"
          + ("  (frame for frame)" if (port["rx"], port["tx"]) == (g_tx, g_rx) else
             "  (NOT the guest's counts)"))
    cwd = Path.cwd()
    where = out.relative_to(cwd) if out.is_relative_to(cwd) else out
    print(f"\nfiles in {where}/:\n  {trace_path.name:<18} Chrome trace JSON: open "
          "https://ui.perfetto.dev, \"Open trace file\"")
    ok = replies == a.packets and (port["rx"], port["tx"]) == (g_tx, g_rx)
    return 0 if ok else 1
