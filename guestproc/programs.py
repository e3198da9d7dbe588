"""The programs a run makes the guest execute, over the guest's sockets.

Each takes the kernel, the stack and the run's options, and returns what it measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.seqwindow import SeqWindow
from guestproc.kernel import Kernel
from guestproc.netstack import GuestStack

SEQ_BYTES = 8
GATEWAY = "10.0.2.2"
Console = Callable[[str], None]


PATTERN = bytes(range(256)) * 7  # long enough for any filler from any starting byte


def payload(seq: int, size: int) -> bytes:
    """Each datagram: its 8-byte big-endian sequence number, then the bytes seq, seq+1, ...
    (mod 256) as filler; made when it is sent, so memory stays flat however many are sent."""
    start = seq & 0xFF
    return seq.to_bytes(SEQ_BYTES, "big") + PATTERN[start : start + max(0, size - SEQ_BYTES)]


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


PROGRESS_EVERY_NS = 1_000_000_000


class Progress:
    """A "progress" console line, at most once a second and only when a count moved: the
    supervisor's run timeout measures the silence since the last one."""

    def __init__(self, kernel: Kernel, console: Console) -> None:
        self.kernel = kernel
        self.console = console
        self.last_ns = kernel.now_ns()
        self.last = ""

    def tick(self, **counts: int) -> None:
        now = self.kernel.now_ns()
        if now - self.last_ns < PROGRESS_EVERY_NS:
            return
        self.last_ns = now
        line = "progress " + " ".join(f"{k}={v}" for k, v in counts.items())
        if line != self.last:
            self.last = line
            self.console(line)


PHASE_PAUSE_MS = 1000.0
"""The guest's pause between two phases of ``phases`` (the recorded QEMU run paused about a
second between its warm-up, its spaced datagrams and its burst)."""


def send_schedule(opts: dict[str, Any]) -> list[float]:
    """How long the guest sleeps after each datagram: ``pace_ms`` after every one, or, with
    ``phases`` ([count, gap_ms] each), ``gap_ms`` between the datagrams of a phase and
    PHASE_PAUSE_MS between phases."""
    phases = opts.get("phases")
    if not phases:
        return [opts.get("pace_ms", 0.0)] * opts["packets"]
    sleeps: list[float] = []
    for i, (count, gap) in enumerate(phases):
        sleeps += [float(gap)] * (count - 1)
        sleeps.append(PHASE_PAUSE_MS if i + 1 < len(phases) else 0.0)
    return sleeps


def udp_send(kernel: Kernel, stack: GuestStack, opts: dict[str, Any],
             console: Console) -> dict[str, Any]:
    """Send ``packets`` datagrams of ``size`` bytes to 10.0.2.2:``dest_port``.

    ``pace_ms`` (or ``phases``: a warm-up, spaced datagrams, a burst...) spaces them out
    (the guest sleeps on its LAPIC timer); ``batch`` > 1 hands them to the driver in
    batches with xmit_more set on all but the last of each.
    """
    n, size, port = opts["packets"], opts["size"], opts["dest_port"]
    sleeps = send_schedule(opts)
    batch = max(1, opts.get("batch", 1))
    sock = stack.socket()
    dst = (GATEWAY, port)
    progress = Progress(kernel, console)
    t0 = kernel.now_ns()
    for seq in range(n):
        sock.sendto(payload(seq, size), dst, more=(seq + 1) % batch != 0 and seq + 1 < n)
        if sleeps[seq]:
            kernel.msleep(sleeps[seq])
            progress.tick(sent=seq + 1)
        elif not seq & 63:
            progress.tick(sent=seq + 1)
    return {"sent": n, "send_ns": kernel.now_ns() - t0, "t0_ns": t0, "sport": sock.port}


def udp_echo_client(kernel: Kernel, stack: GuestStack, opts: dict[str, Any],
                    console: Console) -> dict[str, Any]:
    """Send ``packets`` datagrams to an echo service at 10.0.2.2:``dest_port``, at most
    ``window`` unanswered at a time, and check every reply against what was sent; give up
    after ``timeout`` seconds without a reply."""
    n, size, port = opts["packets"], opts["size"], opts["dest_port"]
    window = max(1, opts.get("window", 1))
    pace = opts.get("pace_ms", 0.0)
    timeout_s = opts.get("timeout", 30.0)
    sock = stack.socket()
    sock.bind(0)
    dst = (GATEWAY, port)
    sent_at = [0] * n
    got = [False] * n
    rtts: list[float] = []
    bad = dup = 0
    next_seq = outstanding = 0
    progress = Progress(kernel, console)
    t0 = kernel.now_ns()
    deadline = t0 + int(timeout_s * 1e9)
    while (next_seq < n or outstanding) and kernel.now_ns() < deadline:
        while next_seq < n and outstanding < window:
            sent_at[next_seq] = kernel.now_ns()
            sock.sendto(payload(next_seq, size), dst)
            next_seq += 1
            outstanding += 1
        r = sock.recvfrom(max(0.0, (deadline - kernel.now_ns()) / 1e9))
        if r is None:
            break
        data, _, arrived = r
        seq = int.from_bytes(data[:SEQ_BYTES], "big") if len(data) >= SEQ_BYTES else -1
        if not 0 <= seq < next_seq or data != payload(seq, size):
            bad += 1
            continue
        if got[seq]:
            dup += 1
            continue
        got[seq] = True
        outstanding -= 1
        deadline = kernel.now_ns() + int(timeout_s * 1e9)
        progress.tick(sent=next_seq, replies=len(rtts) + 1)
        rtts.append((arrived - sent_at[seq]) / 1e3)
        if pace:
            kernel.msleep(pace)
    rtts.sort()
    return {"sent": next_seq, "replies": sum(got), "bad_replies": bad, "duplicate_replies": dup,
            "send_ns": kernel.now_ns() - t0, "rtt_us_p50": percentile(rtts, 50),
            "rtt_us_p99": percentile(rtts, 99), "rtt_us_max": rtts[-1] if rtts else None,
            "sport": sock.port}


def udp_sink(kernel: Kernel, stack: GuestStack, opts: dict[str, Any],
             console: Console) -> dict[str, Any]:
    """Listen on ``guest_port`` and count ``packets`` datagrams from the host (hostfwd),
    giving up after ``timeout`` seconds without one.

    With ``rx_stall_after`` the guest stops refilling its RX ring after that many datagrams
    for ``rx_stall_ms`` (as a guest under memory pressure would), then refills again.
    """
    n = opts["packets"]
    sock = stack.socket()
    sock.bind(opts["guest_port"])
    stall_after = opts.get("rx_stall_after", 0)
    stall_ms = opts.get("rx_stall_ms", 0.0)
    console(f"listening on udp port {sock.port}")
    seqs: list[int] = []
    timeout_s = opts.get("timeout", 30.0)
    progress = Progress(kernel, console)
    first = last = 0
    while len(seqs) < n:
        r = sock.recvfrom(timeout_s)
        if r is None:
            break
        data, _, arrived = r
        progress.tick(received=len(seqs) + 1)
        first = first or arrived
        last = arrived
        seqs.append(int.from_bytes(data[:SEQ_BYTES], "big") if len(data) >= SEQ_BYTES else -1)
        if stall_after and len(seqs) == stall_after:
            rq = stack.dev.priv.rq[0]
            rq.refill_enabled = False
            console(f"rx refill stalled for {stall_ms} ms")
            kernel.msleep(stall_ms)
            rq.refill_enabled = True
            from guestproc.virtio_net import try_fill_recv

            try_fill_recv(stack.dev.priv, rq)
            console("rx refill resumed")
    unique = set(seqs)
    return {"received": len(seqs), "unique": len(unique), "duplicates": len(seqs) - len(unique),
            "in_order": seqs == sorted(seqs), "socket_drops": sock.drops,
            "receive_ns": last - first}


def ping(kernel: Kernel, stack: GuestStack, opts: dict[str, Any],
         console: Console) -> dict[str, Any]:
    """ICMP echo requests to 10.0.2.2, one at a time, each waiting up to a second."""
    n = opts["packets"]
    ident = 0x1234
    rtts: list[float] = []
    progress = Progress(kernel, console)
    t0 = kernel.now_ns()
    for seq in range(n):
        progress.tick(sent=seq)
        t = kernel.now_ns()
        stack.send_ping(GATEWAY, ident, seq, b"vreplica-ping".ljust(56, b"."))
        ok = kernel.wait_event(lambda s=seq: (ident, s) in stack.ping_replies, 1.0)
        if ok:
            rtts.append((kernel.now_ns() - t) / 1e3)
    rtts.sort()
    return {"sent": n, "replies": len(rtts), "send_ns": kernel.now_ns() - t0,
            "rtt_us_p50": percentile(rtts, 50), "rtt_us_p99": percentile(rtts, 99)}


def stress_size(seq: int, lo: int, hi: int, seed: int) -> int:
    """The payload size of datagram ``seq``: a hash both ends compute (no PRNG state)."""
    x = (seq * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return lo + x % (hi - lo + 1)


FAULT_REQUESTS: list[int] = []
"""Ring faults asked for from outside (SIGUSR1, the stress run's ring-fault chaos)."""
CHAOS_FAULT_KINDS = ("loop", "head", "next", "zero-len", "oob-addr")
PACKED_CHAOS_FAULT_KINDS = ("packed-loop", "packed-zero-len", "packed-oob-addr", "packed-order",
                            "packed-indirect-size")
"""The same chaos on a packed ring: faults written the packed ring's way."""


class StressReceiver:
    """What the stress program's sockets brought back: every reply checked against what was
    sent, duplicates and late ones counted, and each host -> guest datagram's arrival. Per
    sequence number only within a window; older numbers fold into runs of lost ones
    (common.seqwindow): memory stays flat for hours."""

    def __init__(self, kernel: Kernel, socks: list[Any], inbound: Any, flows: int) -> None:
        self.kernel = kernel
        self.socks = socks
        self.inbound = inbound
        self.replies = self.bad = self.dup = self.late = self.inbound_count = 0
        self.echoes = SeqWindow(flows)  # per number: when it was sent, when its reply came
        self.inbound_seqs = SeqWindow(1)  # host -> guest numbers: when each came
        self.outstanding: set[int] = set()
        self.gave_up: set[int] = set()

    def give_up(self) -> None:
        """No reply for a while: what is outstanding is given up (a late reply is counted)."""
        self.gave_up = {s for s in self.gave_up if s >= self.echoes.base}  # older: folded
        self.gave_up.update(self.outstanding)
        self.outstanding.clear()

    def drain(self, block_s: float) -> None:
        socks = self.socks
        if block_s and not any(sock.rcvq for sock in socks):
            self.kernel.wait_event(lambda: any(sock.rcvq for sock in socks), block_s)
        for sock in socks:
            while sock.rcvq:
                data, _, arrived = sock.rcvq.popleft()
                seq = int.from_bytes(data[:SEQ_BYTES], "big")
                if sock is self.inbound:
                    self.inbound_count += 1
                    self.inbound_seqs.arrive(seq, arrived, grow=True)
                elif data != payload(seq, len(data)):
                    self.bad += 1
                else:
                    self._reply(seq, arrived)

    def _reply(self, seq: int, arrived: int) -> None:
        verdict = self.echoes.arrive(seq, arrived)
        if verdict == "bad":
            self.bad += 1
        elif verdict == "dup":
            self.dup += 1
        else:
            self.replies += 1
            if seq in self.gave_up:
                self.gave_up.discard(seq)
                self.late += 1
            else:
                self.outstanding.discard(seq)

    def progress(self, sent: int) -> str:
        return (f"progress sent={sent} replies={self.replies} inbound={self.inbound_count} "
                f"awaiting={len(self.outstanding)}")


def stress(kernel: Kernel, stack: GuestStack, opts: dict[str, Any],
           console: Console) -> dict[str, Any]:
    """Sustained load over ``flows`` sockets (so flows spread over the queue pairs):
    ``stress_mode`` tx (to a host sink), echo (through a host echo service, every reply
    checked), or both (echo, plus a host -> guest stream through the hostfwd port).
    Runs for ``packets`` datagrams or ``duration_s`` seconds of guest time."""
    mode = opts.get("stress_mode", "tx")
    n = opts.get("packets") or 1 << 62
    duration_ns = int(opts.get("duration_s", 0) * 1e9) or 1 << 62
    lo, hi = opts.get("sizes", (8, 1472))
    seed = opts.get("seed", 1)
    port = opts["dest_port"]
    flows = [stack.socket() for _ in range(max(1, opts.get("flows", 4)))]
    for f in flows:
        f.bind(0)
    inbound = None
    if mode == "both":
        inbound = stack.socket()
        inbound.bind(opts["guest_port"])
    window = max(1, opts.get("window", 32))
    dst = (GATEWAY, port)
    echo = mode in ("echo", "both")
    sent = 0
    rx = StressReceiver(kernel, flows + ([inbound] if inbound else []), inbound, len(flows))
    outstanding = rx.outstanding
    t0 = last_report = kernel.now_ns()
    end = t0 + duration_ns
    console("stress started")

    progress_at, progress_replies = t0, 0
    faulted: list[int] = []
    while sent < n and kernel.now_ns() < end:
        if FAULT_REQUESTS:  # the next frame carries a ring fault; the guest then resets
            from guestproc.faults import FaultInjector

            FAULT_REQUESTS.clear()
            kinds = PACKED_CHAOS_FAULT_KINDS if stack.dev.priv.sq[0].vq.packed_ring \
                else CHAOS_FAULT_KINDS
            kind = kinds[len(faulted) % len(kinds)]
            FaultInjector(stack.dev.priv, kind, after=0)
            faulted.append(sent)
        if echo and len(outstanding) >= window:
            rx.drain(0.1)
            now = kernel.now_ns()
            if rx.replies != progress_replies:
                progress_at, progress_replies = now, rx.replies
            elif now - progress_at > 500_000_000:  # no reply for half a second: give up
                rx.give_up()
                outstanding = rx.outstanding
                progress_at = now
            continue
        size = stress_size(sent, lo, hi, seed)
        flows[sent % len(flows)].sendto(payload(sent, size), dst)
        if echo:
            outstanding.add(sent)
            rx.echoes.enter(sent, kernel.now_ns())
        sent += 1
        if sent % 64 == 0:
            rx.drain(0.0)
            now = kernel.now_ns()
            if now - last_report > 500_000_000:
                last_report = now
                console(rx.progress(sent))
    console("stress finishing")
    deadline = kernel.now_ns() + 2_000_000_000
    while echo and rx.outstanding and kernel.now_ns() < deadline:
        rx.drain(0.2)
    if inbound is not None:
        quiet_until = kernel.now_ns() + 500_000_000
        while kernel.now_ns() < quiet_until:
            rx.drain(0.1)
    console(rx.progress(sent))
    return {"reply_gaps": rx.echoes.runs() if echo else [],
            "inbound_gaps": rx.inbound_seqs.runs(), "inbound_seen": rx.inbound_seqs.top,
            "inbound_last_ns": rx.inbound_seqs.last_ns,
            "sent": sent, "replies": rx.replies, "bad_replies": rx.bad,
            "duplicate_replies": rx.dup, "inbound": rx.inbound_count,
            "unanswered": sent - rx.replies if echo else 0,
            "late_replies": rx.late, "faulted_seqs": faulted,
            "send_ns": kernel.now_ns() - t0, "flows": [f.port for f in flows]}


PROGRAMS = {"tx": udp_send, "echo": udp_echo_client, "sink": udp_sink, "ping": ping,
            "stress": stress}
