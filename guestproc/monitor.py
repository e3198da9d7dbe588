"""The guest's monitor: the driver's virtqueues and net device, guest memory, and ``send``.

``stop``/``cont``/``step`` hold the vCPU before its next VM exit, so one step is one driver
action: the pending exit, its entry, and the guest code up to the next exit.

The guest is single-threaded. ``send N`` only queues the request; the guest's own flow sends
at its safe points: when the program is done, and in ``--hold``'s idle loop. An idle vCPU
sits in HLT inside KVM, so the monitor rings it the way a host wakes a halted CPU: KVM
injects an NMI (the KVM monitor's ``nmi``), the vCPU leaves HLT, and the idle loop finds
the request.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NoReturn

from common.channel import Channel
from common.kvm_abi import NMI_VECTOR
from common.monitor.client import query as monitor_query
from common.monitor.commands import Arg, MonitorError
from common.monitor.hmp import format_human
from common.monitor.misc import register_memory_dump
from common.monitor.monitor import Monitor
from common.process import ProcessRuntime
from common.vring import VRING_AVAIL_F_NO_INTERRUPT
from common.vring_packed import VRING_PACKED_EVENT_FLAG_DISABLE
from guestproc.cpu import GuestShutdown, VCpu
from guestproc.kernel import Kernel
from guestproc.netstack import GuestStack
from guestproc.programs import GATEWAY, payload

MAX_SEND = 10_000_000


class GuestMonitor:
    """The monitor of the guest process, and the guest's side of ``send`` and ``--hold``."""

    def __init__(self, rt: ProcessRuntime) -> None:
        self.rt = rt
        self.opts = rt.cfg.options
        self.mon = mon = Monitor("guest", rt.rundir)
        self.cpu: VCpu | None = None
        self.ram: memoryview | None = None
        self.kernel: Kernel | None = None
        self.vdev: Any = None
        self.stack: GuestStack | None = None
        self.program = "not started"
        self.requests: deque[tuple[int, int]] = deque()
        self.idle = False
        self.sent = 0
        self.sending = 0
        self.reported = 0  # of ``sent``, how many the report on file counts (--hold)
        self.report: dict | None = None
        self.nmis = 0
        self._seq = int(self.opts.get("packets", 0))
        self._sock: Any = None
        self._entry = Channel(rt.cfg.channel("guest_entry"))
        mon.stats = self.stats
        mon.status_info = self.status_info
        self._register()
        mon.start()

    # -- the guest's side -----------------------------------------------------------------------

    def attach_cpu(self, cpu: VCpu, ram: memoryview) -> None:
        self.cpu = cpu
        self.ram = ram
        cpu.gate.idle_check = self._vm_destroyed
        self.mon.gates.append(cpu.gate)
        self.mon.step_gate = cpu.gate

    def attach(self, kernel: Kernel, vdev: Any, stack: GuestStack) -> None:
        """The driver is up: the program starts now."""
        self.kernel = kernel
        self.vdev = vdev
        self.stack = stack
        kernel.cpu.idt[NMI_VECTOR] = self._do_nmi
        self.program = "running"

    def _vm_destroyed(self) -> None:
        """While the vCPU is held before an exit, a pending entry can only be KVM's shutdown."""
        if self._entry.mq.current_messages:
            raise GuestShutdown

    def _do_nmi(self, vector: int) -> None:
        self.nmis += 1

    def run_requests(self) -> None:
        """Send what ``send`` asked for: the guest program's safe point."""
        stack = self.stack
        assert stack is not None
        dst = (GATEWAY, int(self.opts.get("dest_port", 0)))
        while self.requests:
            n, size = self.requests.popleft()
            self.sending = n
            if self._sock is None:
                self._sock = stack.socket()
            for _ in range(n):
                self._sock.sendto(payload(self._seq, size), dst)
                self._seq += 1
                self.sent += 1
                self.sending -= 1

    def hold(self, report: dict) -> NoReturn:
        """``--hold``: report the program done, then idle in HLT serving ``send`` until the
        host destroys the VM (``quit``), which ends this CPU with GuestShutdown."""
        kernel = self.kernel
        assert kernel is not None
        kernel.arm_timer(0)
        self.program = "done"
        self.report = report
        self.rt.report(report)
        self.reported = self.sent
        self.rt.tell("done")
        while True:
            self.idle = True
            kernel.wait_event(lambda: bool(self.requests))
            self.idle = False
            self.run_requests()
            report["sent_by_monitor"] = self.sent  # the summary counts them in ``sent``
            self.rt.report(report)
            self.reported = self.sent

    def close(self) -> None:
        self.mon.close()
        self._entry.close()

    # -- what the monitor shows -----------------------------------------------------------------

    def status_info(self) -> dict[str, Any]:
        cpu = self.cpu
        return {"program": self.program, "vm_exits": cpu.exits if cpu else 0,
                "pending_sends": sum(n for n, _ in list(self.requests)) + self.sending
                + (self.sent - self.reported if self.report is not None else 0),
                "sent_by_monitor": self.sent}

    def virtqueues(self) -> list[dict[str, Any]]:
        if self.vdev is None:
            return []
        out = []
        for vq in self.vdev.vqs:
            if vq is None:
                continue
            lay = vq.layout
            if vq.packed_ring:
                out.append(packed_virtqueue_row(vq))
                continue
            out.append({
                "name": vq.name, "index": vq.index, "num": vq.num, "num_free": vq.num_free,
                "free_head": vq.free_head, "avail_idx_shadow": vq.avail_idx_shadow,
                "avail_idx": vq.avail[1], "last_used_idx": vq.last_used_idx,
                "used_idx": vq.used_hdr[1], "num_added": vq.num_added,
                "avail_flags_shadow": vq.avail_flags_shadow,
                "callbacks_enabled": not vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT,
                "event_idx": vq.event, "used_event": vq.avail[2 + vq.num],
                "avail_event": vq.avail_event_h[0], "event_triggered": vq.event_triggered,
                "broken": vq.broken, "kicks": vq.kicks, "interrupts": vq.interrupts,
                "desc": lay.desc, "avail": lay.avail, "used": lay.used,
            })
        return out

    def netdev(self) -> dict[str, Any]:
        if self.vdev is None or self.stack is None:
            raise MonitorError("the virtio-net driver is not probed yet")
        vi = self.vdev.priv
        dev = vi.dev
        return {
            "name": dev.name, "mac": dev.dev_addr.hex(":"), "mtu": dev.mtu,
            "ip": ".".join(map(str, self.stack.ip)), "features": self.vdev.features,
            "tx_queue_stopped": list(dev.tx_stopped), "stats": dict(dev.stats),
            "sq": [{"name": q.name, **q.stats, "num_free": q.vq.num_free} for q in vi.sq],
            "rq": [{"name": q.name, **q.stats, "num_free": q.vq.num_free} for q in vi.rq],
            "stack": dict(self.stack.counters),
            "neighbours": {".".join(map(str, ip)): mac.hex(":")
                           for ip, mac in dict(self.stack.neigh).items()},
            "udp_sockets": sorted(self.stack.sockets),
        }

    def stats(self) -> dict[str, Any]:
        cpu = self.cpu
        out: dict[str, Any] = {"vm_exits": cpu.exits if cpu else 0, "nmis": self.nmis,
                               "program": self.program, "sent_by_monitor": self.sent}
        if self.kernel is not None:
            out["irqs"] = dict(self.kernel.irq_count)
        if self.vdev is not None and self.stack is not None:
            out["netdev"] = self.netdev()
            out["virtqueues"] = self.virtqueues()
        return out

    def _read(self, addr: int, length: int) -> bytes:
        ram = self.ram
        if ram is None:
            raise MonitorError("guest RAM is not mapped yet")
        if addr < 0 or addr + length > len(ram):
            raise MonitorError(f"0x{addr:x}+{length} is outside guest RAM (0x{len(ram):x})")
        return bytes(ram[addr : addr + length])

    def _register(self) -> None:
        cmd = self.mon.command

        @cmd(hmp="info virtqueues", qmp=False, human=virtqueues_text,
             help="show the driver's virtqueues (struct vring_virtqueue)")
        def info_virtqueues() -> list[dict[str, Any]]:
            return self.virtqueues()

        @cmd(hmp="info netdev", qmp=False, human=format_human,
             help="show eth0: address, TX queue state, counters")
        def info_netdev() -> dict[str, Any]:
            return self.netdev()

        @cmd(hmp="send", qmp=False, args=(Arg("count", "int"), Arg("size", "int", True)),
             params="N [size]",
             human=lambda d: f"{d['queued']} datagrams of {d['size']} bytes to {d['to']}: "
                             f"queued, sent {d['sent']}",
             help="the guest sends N more datagrams to the run's destination")
        def send(count: int, size: int | None = None) -> dict[str, Any]:
            n = count
            if size is None:
                size = int(self.opts.get("size", 64))
            if not 1 <= n <= MAX_SEND or not 8 <= size <= 1472:
                raise MonitorError(f"send: N must be 1..{MAX_SEND} and SIZE 8..1472",
                                   "InvalidParameter")
            port = int(self.opts.get("dest_port", 0))
            if not port:
                raise MonitorError("send: this run has no destination port")
            self.requests.append((n, size))
            if self.idle:
                try:
                    monitor_query(self.rt.rundir, "kvm", "nmi")
                except (OSError, MonitorError) as e:
                    raise MonitorError(f"send: queued, but the halted vCPU could not be woken "
                                       f"(KVM's nmi: {e})") from None
            when = {"not started": "after the program",
                    "running": "when the program is done"}.get(self.program, "now")
            return {"queued": n, "size": size, "to": f"{GATEWAY}:{port}",
                    "pending": self.status_info()["pending_sends"], "sent": when}

        register_memory_dump(self.mon, self._read)


def packed_virtqueue_row(vq: Any) -> dict[str, Any]:
    """One packed ring's driver state: positions, wrap counters, both event structures."""
    lay = vq.layout
    drv, dev = vq.v.driver, vq.v.device
    return {
        "name": vq.name, "index": vq.index, "num": vq.num, "num_free": vq.num_free,
        "free_head": vq.free_head, "packed": True, "next_avail_idx": vq.next_avail_idx,
        "avail_wrap_counter": int(vq.avail_wrap_counter),
        "last_used_idx": vq.last_used_idx & 0x7FFF,
        "used_wrap_counter": vq.last_used_idx >> 15, "num_added": vq.num_added,
        "event_flags_shadow": vq.event_flags_shadow,
        "callbacks_enabled": vq.event_flags_shadow != VRING_PACKED_EVENT_FLAG_DISABLE,
        "event_idx": vq.event, "driver_event": {"off_wrap": drv[0], "flags": drv[1]},
        "device_event": {"off_wrap": dev[0], "flags": dev[1]},
        "event_triggered": vq.event_triggered, "broken": vq.broken, "kicks": vq.kicks,
        "interrupts": vq.interrupts, "desc": lay.desc, "avail": lay.driver,
        "used": lay.device,
    }


def virtqueues_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r.get("packed"):
            lines.append(f"{r['name']} (vq {r['index']}, packed): num {r['num']}, num_free "
                         f"{r['num_free']}, next_avail_idx {r['next_avail_idx']} wrap "
                         f"{r['avail_wrap_counter']}, last_used_idx {r['last_used_idx']} wrap "
                         f"{r['used_wrap_counter']}")
            de, ve = r["driver_event"], r["device_event"]
            lines.append(f"  callbacks {'enabled' if r['callbacks_enabled'] else 'disabled'}"
                         f", driver event off_wrap 0x{de['off_wrap']:x} flags {de['flags']}, "
                         f"device event off_wrap 0x{ve['off_wrap']:x} flags {ve['flags']}, "
                         f"broken {str(r['broken']).lower()}, kicks {r['kicks']}, "
                         f"interrupts {r['interrupts']}")
            lines.append(f"  desc 0x{r['desc']:x} driver 0x{r['avail']:x} "
                         f"device 0x{r['used']:x}")
            continue
        lines.append(f"{r['name']} (vq {r['index']}): num {r['num']}, num_free "
                     f"{r['num_free']}, avail idx {r['avail_idx_shadow']}, last_used_idx "
                     f"{r['last_used_idx']}, used idx {r['used_idx']}")
        lines.append(f"  callbacks {'enabled' if r['callbacks_enabled'] else 'disabled'}"
                     f", used_event {r['used_event']}, avail_event {r['avail_event']}, "
                     f"broken {str(r['broken']).lower()}, kicks {r['kicks']}, "
                     f"interrupts {r['interrupts']}")
        lines.append(f"  desc 0x{r['desc']:x} avail 0x{r['avail']:x} used 0x{r['used']:x}")
    return "\n".join(lines) or "no virtqueues yet"
