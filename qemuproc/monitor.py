"""QEMU's monitor (HMP, with QMP-shaped JSON): the virtio device and its queues, the network,
the main loop's bottom halves and fd handlers, guest memory, and the VM's run state.

``stop`` holds both QEMU threads: the main loop after its current ``main_loop_wait`` (with
the Big QEMU Lock dropped) and the vCPU thread before its next KVM_RUN. As pause_all_vcpus
does, it signals a vCPU thread that is inside KVM_RUN (SIG_IPI): KVM makes the guest exit and
KVM_RUN return KVM_EXIT_INTR, so the whole VM pauses. ``step`` runs one ``main_loop_wait``.
``-S`` (``--wait-attach``) is the prelaunch state: the vCPU thread does not issue its first
KVM_RUN until ``cont``. Info commands take the BQL when they can get it within 50 ms and read
without it otherwise, so they answer while the process is blocked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from common.guest_memory import GuestMemoryError
from common.monitor import SIG_IPI, Gate, Monitor, MonitorError, Reply, memory_dump, parse_int
from common.virtio_abi import (
    FEATURE_NAMES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
)
from common.vring import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from qemuproc.kvm_all import KvmError

if TYPE_CHECKING:
    from qemuproc.__main__ import Machine

VIRTIO_PATH = "/machine/peripheral-anon/device[0]/virtio-backend"
BQL_WAIT_S = 0.05

STATUS_NAMES = [
    (VIRTIO_CONFIG_S_ACKNOWLEDGE, "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found"),
    (VIRTIO_CONFIG_S_DRIVER, "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"),
    (VIRTIO_CONFIG_S_FEATURES_OK, "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete"),
    (VIRTIO_CONFIG_S_DRIVER_OK, "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"),
    (VIRTIO_CONFIG_S_NEEDS_RESET, "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device "
                                  "needs reset"),
    (VIRTIO_CONFIG_S_FAILED, "VIRTIO_CONFIG_S_FAILED: Error in guest, device failed"),
]
TRANSPORT_BITS = range(24, 41)
DESC_FLAGS = [(VRING_DESC_F_NEXT, "next"), (VRING_DESC_F_WRITE, "write"),
              (VRING_DESC_F_INDIRECT, "indirect")]


def decode_status(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"statuses": [name for bit, name in STATUS_NAMES if status & bit]}
    unknown = status & ~sum(bit for bit, _ in STATUS_NAMES)
    if unknown:
        out["unknown-statuses"] = unknown
    return out


def decode_features(bits: int) -> dict[str, Any]:
    known = {b: n for b, n in FEATURE_NAMES.items() if bits & (1 << b)}
    out: dict[str, Any] = {
        "transports": [n for b, n in sorted(known.items()) if b in TRANSPORT_BITS],
        "dev-features": [n for b, n in sorted(known.items()) if b not in TRANSPORT_BITS],
    }
    unknown = bits & ~sum(1 << b for b in known)
    if unknown:
        out["unknown-dev-features"] = unknown
    return out


def _flags_text(names: list[str]) -> str:
    return f" ({', '.join(names)})" if names else ""


class QemuMonitor:
    """The monitor of one QEMU process (``m`` is its Machine)."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        ml = m.main_loop
        self.mon = mon = Monitor("qemu", m.rt.rundir)
        mon.aliases["q"] = "quit"
        self.main_gate = gate = Gate("main-loop")
        gate.on_park = ml.bql.release
        gate.on_unpark = ml.bql.acquire
        gate.nudge = ml.qemu_notify_event
        gate.on_arm = self._arm_main_loop
        self._hook: Callable[[], None] | None = ml.on_iteration
        m.cpu.gate.nudge = self._kick_vcpu
        mon.gates += [gate, m.cpu.gate]
        mon.step_gate = gate
        mon.stats = self.stats
        mon.status_info = self.status_info
        if m.rt.cfg.options.get("wait_attach"):
            mon.prelaunch = True
            m.cpu.gate.request_stop(nudge=False)
        self._register()
        mon.start()

    def _arm_main_loop(self, armed: bool) -> None:
        """The main loop calls its on_iteration hook only while the gate is armed."""
        hook = self._hook
        if not armed:
            self.m.main_loop.on_iteration = hook
        elif hook is None:
            self.m.main_loop.on_iteration = self.main_gate.wait
        else:
            def both() -> None:
                self.main_gate.wait()
                hook()

            self.m.main_loop.on_iteration = both

    def _kick_vcpu(self) -> None:
        """qemu_cpu_kick: a vCPU thread inside KVM_RUN is signalled out of it."""
        if not self.m.cpu.gate.parked:
            try:
                self.m.kvm.kvm_vm_ioctl(SIG_IPI, self.m.cpu.cpu_index)
            except KvmError:
                pass

    def close(self) -> None:
        self.mon.close()

    @contextlib.contextmanager
    def bql(self) -> Iterator[None]:
        lock = self.m.main_loop.bql
        got = lock.acquire(timeout=BQL_WAIT_S)
        try:
            yield
        finally:
            if got:
                lock.release()

    # -- state ----------------------------------------------------------------------------------

    def status_info(self) -> dict[str, Any]:
        mem = self.m.mem
        return {"ram": {"name": mem.name, "size": mem.size}}

    def stats(self) -> dict[str, Any]:
        with self.bql():
            return self.m.report()

    def _vq(self, args: list[str], usage: str) -> tuple[Any, list[str]]:
        """The queue named by ``[path] queue`` and the arguments after it."""
        if args and args[0].startswith("/"):
            if args[0] != VIRTIO_PATH:
                raise MonitorError(f"Path {args[0]} is not a VirtIODevice")
            args = args[1:]
        if not args:
            raise MonitorError(f"usage: {usage}", "InvalidParameter")
        n = parse_int(args[0], "queue")
        vdev = self.m.n
        if not 0 <= n < len(vdev.vq):
            raise MonitorError(f"Invalid virtqueue number {n}")
        return vdev.vq[n], args[1:]

    # -- commands -------------------------------------------------------------------------------

    def _register(self) -> None:
        cmd = self.mon.command
        m = self.m

        @cmd("info virtio", "", "list all available virtio devices")
        def info_virtio(args: list[str]) -> Reply:
            rows = [{"path": VIRTIO_PATH, "name": m.n.name}]
            return Reply(rows, "\n".join(f"{r['path']} [{r['name']}]" for r in rows))

        @cmd("info virtio-status", "[path]", "show a virtio device's status")
        def info_virtio_status(args: list[str]) -> Reply:
            if args and args[0] != VIRTIO_PATH:
                raise MonitorError(f"Path {args[0]} is not a VirtIODevice")
            vdev = m.n
            with self.bql():
                d = {
                    "name": vdev.name, "device-id": vdev.device_id, "vhost-started": False,
                    "bus-name": "virtio-pci-bus", "broken": vdev.broken, "disabled": False,
                    "disable-legacy-check": False, "started": vdev.started, "use-started": True,
                    "start-on-kick": False, "use-guest-notifier-mask": True,
                    "vm-running": vdev.vm_running, "num-vqs": len(vdev.vq),
                    "queue-sel": vdev.queue_sel, "isr": vdev.isr, "device-endian": "little",
                    "status": decode_status(vdev.status),
                    "guest-features": decode_features(vdev.guest_features),
                    "host-features": decode_features(vdev.host_features),
                    "backend-features": decode_features(0),
                    "errors": list(vdev.errors),
                }
            yes = {True: "true", False: "false"}
            lines = [f"{VIRTIO_PATH}:", f"  device_name:             {d['name']}",
                     f"  device_id:               {d['device-id']}"]
            for key in ("vhost-started", "bus-name", "broken", "disabled",
                        "disable-legacy-check", "started", "use-started", "start-on-kick",
                        "use-guest-notifier-mask", "vm-running", "num-vqs", "queue-sel", "isr",
                        "device-endian"):
                v = d[key]
                label = key.replace("-", "_").replace("device_endian", "endianness") + ":"
                lines.append(f"  {label:<25}{yes.get(v, v) if isinstance(v, bool) else v}")
            lines.append("  status:")
            lines.append(",\n".join(f"\t{s}" for s in d["status"]["statuses"]))
            for title, key in (("Guest features", "guest-features"),
                               ("Host features", "host-features"),
                               ("Backend features", "backend-features")):
                lines.append(f"  {title}:")
                f = d[key]
                names = f["transports"] + f["dev-features"]
                lines.append(",\n".join(f"\t{n}" for n in names))
            if d["errors"]:
                lines.append("  errors:")
                lines += [f"\t{e}" for e in d["errors"]]
            return Reply(d, "\n".join(lines))

        @cmd("info virtio-queue-status", "[path] queue", "show a virtio queue's status")
        def info_virtio_queue_status(args: list[str]) -> Reply:
            vq, _ = self._vq(args, "info virtio-queue-status [path] queue")
            with self.bql():
                d = {
                    "name": m.n.name, "queue-index": vq.queue_index, "inuse": vq.inuse,
                    "vring-num": vq.num, "vring-num-default": vq.num_default,
                    "vring-align": vq.align, "vring-desc": vq.desc, "vring-avail": vq.avail,
                    "vring-used": vq.used, "last-avail-idx": vq.last_avail_idx,
                    "shadow-avail-idx": vq.shadow_avail_idx, "used-idx": vq.used_idx,
                    "signalled-used": vq.signalled_used,
                    "signalled-used-valid": vq.signalled_used_valid,
                }
            text = "\n".join([
                f"{VIRTIO_PATH}:",
                f"  device_name:          {d['name']}",
                f"  queue_index:          {d['queue-index']}",
                f"  inuse:                {d['inuse']}",
                f"  used_idx:             {d['used-idx']}",
                f"  signalled_used:       {d['signalled-used']}",
                f"  signalled_used_valid: {str(d['signalled-used-valid']).lower()}",
                f"  last_avail_idx:       {d['last-avail-idx']}",
                f"  shadow_avail_idx:     {d['shadow-avail-idx']}",
                "  VRing:",
                f"    num:          {d['vring-num']}",
                f"    num_default:  {d['vring-num-default']}",
                f"    align:        {d['vring-align']}",
                f"    desc:         0x{d['vring-desc']:016x}",
                f"    avail:        0x{d['vring-avail']:016x}",
                f"    used:         0x{d['vring-used']:016x}",
            ])
            return Reply(d, text)

        @cmd("info virtio-queue-element", "[path] queue [index]",
             "show the descriptor chain at an avail ring index (default: last_avail_idx)")
        def info_virtio_queue_element(args: list[str]) -> Reply:
            vq, rest = self._vq(args, "info virtio-queue-element [path] queue [index]")
            if not vq.desc:
                raise MonitorError(f"virtqueue {vq.queue_index} is not set up by the driver")
            dma = m.n.dma
            try:
                with self.bql():
                    index = parse_int(rest[0], "index") if rest else vq.last_avail_idx
                    avail_flags, avail_idx = _u16s(dma.dma_memory_read(vq.avail, 4))
                    head = _u16s(dma.dma_memory_read(vq.avail + 4 + 2 * (index % vq.num), 2))[0]
                    used_flags, used_idx = _u16s(dma.dma_memory_read(vq.used, 4))
                    descs = []
                    i = head
                    while i < vq.num and len(descs) < vq.num:
                        addr, length, flags, nxt = DESC.unpack(
                            dma.dma_memory_read(vq.desc + 16 * i, 16))
                        descs.append({"addr": addr, "len": length,
                                      "flags": [n for bit, n in DESC_FLAGS if flags & bit]})
                        if not flags & VRING_DESC_F_NEXT:
                            break
                        i = nxt
            except GuestMemoryError as e:
                raise MonitorError(f"virtqueue {vq.queue_index}: {e}") from None
            d = {"name": m.n.name, "index": head, "descs": descs,
                 "avail": {"flags": avail_flags, "idx": avail_idx, "ring": head},
                 "used": {"flags": used_flags, "idx": used_idx}}
            desc_lines = ",\n".join(f"        addr 0x{x['addr']:x} len {x['len']}"
                                    f"{_flags_text(x['flags'])}" for x in descs)
            text = "\n".join([
                f"{VIRTIO_PATH}:", f"  device_name: {d['name']}", f"  index:   {head}",
                "  desc:", "    descs:", desc_lines, "  avail:", f"    flags: {avail_flags}",
                f"    idx:   {avail_idx}", f"    ring:  {head}", "  used:",
                f"    flags: {used_flags}", f"    idx:   {used_idx}",
            ])
            return Reply(d, text)

        @cmd("info network", "", "show the network state")
        def info_network(args: list[str]) -> Reply:
            nic = m.n.nic
            netdev = m.netdev
            with self.bql():
                rows = []
                backend = ("net=10.0.2.0,restrict=off" if m.slirp is not None else
                           f"ifname=tap0,script=no,downscript=no,vhost="
                           f"{'on' if m.tap.vhost_net else 'off'}")
                for nc, info in ((nic, f"model={nic.model},macaddr={m.n.mac.hex(':')}"),
                                 (netdev, backend)):
                    q = nc.incoming_queue
                    rows.append({"name": nc.name, "type": nc.info.type, "info": info,
                                 "peer": nc.peer.name if nc.peer else None,
                                 "link_down": nc.link_down,
                                 "receive_disabled": nc.receive_disabled, "sent": nc.sent,
                                 "received": nc.received,
                                 "incoming_queue": {"len": len(q.packets), "queued": q.queued,
                                                    "dropped": q.dropped,
                                                    "maxlen": q.nq_maxlen}})
                slirp = m.slirp.describe() if m.slirp is not None else None
                tap = m.tap.describe() if m.tap is not None else None
                if tap is not None and m.tap.vhost_net:
                    tap["vhost"] = m.vhost_describe()
            lines = []
            for j, r in enumerate(rows):
                lead = "" if j == 0 else " \\ "
                lines.append(f"{lead}{r['name']}: index=0,type={r['type']},{r['info']}")
                q = r["incoming_queue"]
                off = ", receive disabled" if r["receive_disabled"] else ""
                lines.append(f"{'   ' if j else ''}  sent {r['sent']}, received {r['received']},"
                             f" queue {q['len']}/{q['maxlen']} (queued {q['queued']}, dropped "
                             f"{q['dropped']}){off}")
            if slirp is not None:
                s = slirp["stats"]
                lines.append(f"   slirp: udp sent {s.get('udp_sent', 0)}, received "
                             f"{s.get('udp_received', 0)}, {len(slirp['flows'])} flow(s)")
            if tap is not None:
                t = tap["stats"]
                lines.append(f"   tap: fd {tap['fd']}, vnet header {tap['vnet_hdr_len']} B, "
                             f"written {t['written']} (would block {t['write_eagain']}), "
                             f"read {t['read']}")
                if "vhost" in tap:
                    v = tap["vhost"]
                    who = ("the kernel's vhost worker serves the queues" if v["started"]
                           else "QEMU serves the queues")
                    lines.append(f"   vhost-net: {'started' if v['started'] else 'stopped'} "
                                 f"(starts {v['starts']}, stops {v['stops']}): {who}")
            return Reply({"clients": rows, "slirp": slirp, "tap": tap}, "\n".join(lines))

        @cmd("info bh", "", "show the main AioContext's bottom halves")
        def info_bh(args: list[str]) -> Reply:
            ctx = m.main_loop.ctx
            with self.bql():
                rows = [{"name": bh.name, "callback": getattr(bh.cb, "__name__", str(bh.cb)),
                         "scheduled": bh.scheduled, "idle": bh.idle, "deleted": bh.deleted,
                         "runs": bh.runs} for bh in ctx.first_bh]
                d = {"bhs": rows, "walking_bh": ctx.walking_bh, "notified": ctx.notified,
                     "aio_notifies": ctx.notifies}
            lines = [f"{r['callback']}: scheduled={int(r['scheduled'])} idle={int(r['idle'])} "
                     f"deleted={int(r['deleted'])} runs={r['runs']}" for r in rows]
            lines.append(f"walking_bh={d['walking_bh']} notified={int(d['notified'])} "
                         f"aio_notify calls={d['aio_notifies']}")
            return Reply(d, "\n".join(lines))

        @cmd("info iohandlers", "", "show the main loop's fd handlers, pollfds and timers")
        def info_iohandlers(args: list[str]) -> Reply:
            ml = m.main_loop
            with self.bql():
                rows = [{"fd": r.fd, "name": r.name,
                         "fd_read": getattr(r.fd_read, "__name__", None),
                         "fd_write": getattr(r.fd_write, "__name__", None),
                         "deleted": r.deleted} for r in ml.io_handlers]
                slirp_fds: list[tuple[int, int]] = []
                for fill in ml.pollfds_fill:  # as the next iteration will (a due flow expires)
                    fill(slirp_fds, -1)
                timers = [{"name": t.name, "expire_ns": exp} for exp, _, t in ml.timers
                          if t.armed and t.expire_ns == exp]
                d = {"aio_notifier": ml.ctx.notifier, "handlers": rows,
                     "pollfds": [fd for fd, _ in slirp_fds], "timers": timers,
                     "iterations": ml.iterations}
            lines = [f"aio notifier: fd {d['aio_notifier']}"]
            lines += [f"fd {r['fd']}: {r['name']} read={r['fd_read']} write={r['fd_write']}"
                      f"{' (deleted)' if r['deleted'] else ''}" for r in rows]
            lines.append(f"slirp pollfds: {d['pollfds']}")
            lines += [f"timer {t['name']}: expires at {t['expire_ns']} ns" for t in timers]
            lines.append(f"main_loop_wait iterations: {d['iterations']}")
            return Reply(d, "\n".join(lines))

        @cmd("xp", "/fmt addr", "dump guest-physical memory (count, format x/d/u/o/c, "
                                "size b/h/w/g)")
        def xp(args: list[str]) -> Reply:
            return memory_dump(m.mem.dma_memory_read, args, "xp")

        @cmd("quit", "", "quit the emulator: QEMU exits, KVM destroys the VM, the guest ends")
        def quit_(args: list[str]) -> Reply:
            def shutdown() -> None:
                m.main_loop.quit = True
                self.main_gate.release()
                m.main_loop.qemu_notify_event()

            self.mon.after_reply(shutdown)
            return Reply({}, "")


def _u16s(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]


def qemu_monitor(m: Machine) -> QemuMonitor:
    """Build and start QEMU's monitor for machine ``m`` (before its vCPU thread starts)."""
    return QemuMonitor(m)
