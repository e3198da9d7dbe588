"""Stands for QEMU's CPR (CheckPoint and Restart: migration/cpr.c, ``-incoming`` in
cpr-transfer mode, which keeps guest RAM and the KVM fds across a new QEMU) together with a
vhost-user back end's reconnect: ``vreplica run --reconnect`` lets QEMU die (kill -9) under
load; the supervisor starts a new QEMU with ``-incoming``, which takes over the same guest
from where the dead one left it. The guest never resets; it only pauses.

What survives QEMU, and what the new QEMU does with it:

* Guest RAM (the shm segment): the rings and buffers, mapped again.
* KVM (another process, as the kernel is): the VM, the vCPU, the LAPIC and IOAPIC, and
  the ioeventfds registered on the run's named semaphores. The new QEMU replays the
  device's DRIVER_OK set-up (``virtio_pci_start_ioeventfd``): that rebuilds its own side
  (new PollBridge threads on the same semaphores). KVM takes a registration identical to
  one it holds as done (real KVM's -EEXIST) and keeps the one it has, so the kicks pending
  on them carry on; what it lacks (a QEMU that died inside DRIVER_OK) is added.
* The device-state record, ``vmstate.json`` in the run directory, written atomically
  (temporary file + rename; no fsync: it must outlive QEMU, not the machine): PCI config
  space, the MSI-X table, the PCI host's CONFIG_ADDRESS, virtio status, features, queue
  PFNs and sizes, vectors, config vector, queue_sel, ISR, a broken device's reason, and
  virtio-net's queue pairs. QEMU writes it after every guest write that can change it (the
  legacy BAR except QUEUE_NOTIFY, the MSI-X table, the PCI config ports) and after a
  control-queue command, while it handles that exit, before the next KVM_RUN lets the guest
  go on: the guest cannot see state the record lacks. (The control queue's reply is pushed
  after the record is written.) ISR, the INTx level and the MSI-X PBA change with each
  interrupt and are not written: the new QEMU raises every queue's interrupt once instead
  (``vring_interrupt`` finds nothing new and says IRQ_NONE) and an ISR read returns 1.
* The inflight segment (qemuproc/vhost_user_inflight.py): the heads popped and not used.
  Each queue's ``used_idx`` is the ring's ``used->idx``; ``last_avail_idx`` starts there, so
  the chains the dead QEMU had popped and not completed are popped again, in order.
  Duplicates: a TX chain slirp had sent and QEMU had not yet pushed is sent again. With
  pop, send, push one chain at a time that is at most one chain per TX queue; the bound the
  record gives (and the summary's ``resubmitted``) is the chains in flight, at most one
  queue's worth. RX buffers in flight are filled again: a frame being copied is lost, as a
  NIC drops one (host to guest UDP has no delivery guarantee here).

The vCPU. QEMU's vCPU thread and KVM's alternate on the vCPU channels: KVM_RUN, exit,
KVM_RUN, exit. QEMU can die (A) after sending KVM_RUN before KVM took it, (B) while KVM runs
the guest, (C) after KVM sent the exit before QEMU read it, (D) while QEMU handles the exit.
In every case KVM's vCPU thread ends up waiting for the next KVM_RUN with ``last_exit`` the
exit that KVM_RUN must complete; stale messages may sit in the queues (A: a KVM_RUN, C: an
exit). The new QEMU sends KVM_RUN_MMAP (it maps kvm_run again) on the vCPU channel: KVM
serves it in order after any stale KVM_RUN, so every exit read before its reply is stale,
and the reply carries the exit to handle. QEMU handles it as kvm_cpu_exec would (its
completion data, for an IN or MMIO read, is computed afresh) and resumes with KVM_RUN. An
exit the dead QEMU had already handled (D) is handled again: register writes are
idempotent, an ISR read returns 1 (above). The handshake waits, without the BQL, as KVM_RUN
does: in (B) until the guest's next exit to user space.

The VM channel. A dead QEMU may have left a VM ioctl whose reply nobody read, or one KVM has
not served yet. The new QEMU's first VM ioctl is VM_CHANNEL_SYNC with a token: replies read
before its echo are stale.

Kicks. The ioeventfd semaphores keep KVM's signals while no QEMU waits; the new bridges take
them. A signal the dead QEMU's bridge took and never passed on is lost, so the new device
runs every ready queue's handler once (as vhost-user back ends kick themselves after
reconnecting).

Lost with QEMU: slirp's flows (new host sockets and source ports; replies to the old ones
are dropped), frames waiting in QEMU's net queues, the earlier incarnations' pcap and trace.

Other orders that could race: the supervisor starts the new QEMU only after reaping the
dead one, so two QEMUs never share the run; the record and the inflight flags are written
only by QEMU, and under the BQL, so the new QEMU reads a settled record.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.channel import Channel
from common.kvm_abi import (
    KVM_EXIT_NAMES,
    KVM_RUN_MMAP,
    VM_CHANNEL_SYNC,
    packb,
)
from common.virtio_abi import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_PCI_QUEUE_NOTIFY,
)
from qemuproc.kvm_all import CPUState, KvmError, KVMState, kvm_handle_exit
from qemuproc.memory import MemoryRegionOps
from qemuproc.vhost_user_inflight import (
    InflightRegions,
    QueueRecovery,
    virtio_queue_check_inflights,
    virtio_queue_packed_check_inflights,
)
from qemuproc.virtio import (
    virtio_notify,
    virtio_queue_notify_vq,
    virtio_queue_ready,
    virtio_queue_set_addr,
    virtio_queue_set_notification,
    virtio_queue_set_rings,
    virtio_set_features,
    virtio_set_status,
)
from qemuproc.virtio_net import (
    rx_filter_load,
    rx_filter_state,
    virtio_net_set_queue_pairs,
    virtio_net_vhost_status,
)

if TYPE_CHECKING:
    from common.process import ProcessRuntime
    from qemuproc.memory import AddressSpace
    from qemuproc.pci import PCIHostState
    from qemuproc.tap import TAPState
    from qemuproc.virtio_net import VirtIONet
    from qemuproc.virtio_pci import VirtIOPCIProxy

VMSTATE_FILE = "vmstate.json"
HISTORY_FILE = "cpr.jsonl"
VMSTATE_VERSION = 2
SYNC_TIMEOUT_S = 5.0


class Machine(Protocol):
    """What the record reads and restores of the machine (qemuproc.machine.Machine)."""

    rt: ProcessRuntime
    n: VirtIONet
    proxy: VirtIOPCIProxy
    host: PCIHostState
    io_as: AddressSpace
    mem_as: AddressSpace
    tap: TAPState | None
    kvm: KVMState


class Cpr:
    """A machine's part in surviving its QEMU: the record, the inflight regions, -incoming."""

    def __init__(self, m: Machine, incoming: bool) -> None:
        self.m = m
        self.enabled = bool(m.rt.cfg.options.get("reconnect")) or incoming
        self.incoming = incoming
        self.path = Path(m.rt.cfg.rundir) / VMSTATE_FILE
        self._last = ""
        self.saves = 0
        self.recovered: list[QueueRecovery] = []
        self.restore_ms = 0.0
        self.stale_vm_replies = 0
        self.stale_exits = 0
        self.replayed_exit: str | None = None
        self.regions: InflightRegions | None = None
        if not self.enabled:
            return
        self.regions = InflightRegions(m.rt.cfg)
        self.regions.attach(m.n)
        self._install_hooks()
        incarnation, resubmitted = self.regions.counters()
        if incoming:
            t0 = time.monotonic()
            self.cpr_incoming()
            self.restore_ms = (time.monotonic() - t0) * 1e3
            resubmitted += sum(r.resubmit for r in self.recovered if r.name.startswith("TX"))
            self.log(self.incoming_record())
        else:
            self.save()
        self.regions.set_counters(incarnation + 1, resubmitted)

    # -- the device-state record ------------------------------------------------------------

    def vmstate(self) -> dict[str, Any]:
        m = self.m
        vdev, dev = m.n, m.proxy.pci_dev
        return {
            "version": VMSTATE_VERSION,
            "pci": {"config": dev.config.hex(), "msix_table": dev.msix_table.hex()},
            "pci_host": {"config_reg": m.host.config_reg},
            "virtio": {
                "status": vdev.status, "guest_features": vdev.guest_features,
                "queue_sel": vdev.queue_sel, "config_vector": vdev.config_vector,
                "isr": vdev.isr, "broken": vdev.broken_reason if vdev.broken else None,
                "queues": [{"pa": vq.desc, "avail": vq.avail, "used": vq.used, "num": vq.num,
                            "vector": vq.vector} for vq in vdev.vq],
            },
            "virtio_pci_modern": {
                "dfselect": m.proxy.dfselect, "gfselect": m.proxy.gfselect,
                "guest_features": m.proxy.guest_features,
                "vqs": [[q.num, q.enabled, q.desc, q.avail, q.used]
                        for q in m.proxy.vqs[: len(vdev.vq)]],
            },
            "virtio_net": {"curr_queue_pairs": vdev.curr_queue_pairs,
                           "rx_filter": rx_filter_state(vdev)},
        }

    def save(self) -> None:
        """Write the record if it changed: a temporary file renamed over the old one."""
        text = json.dumps(self.vmstate())
        if text == self._last:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(self.path)
        self._last = text
        self.saves += 1

    def _install_hooks(self) -> None:
        """Save after each guest write to a register region (but the notify register), and
        after each control-queue command that sets virtio-net state."""
        m = self.m
        for as_ in (m.io_as, m.mem_as):
            for mr in as_.regions:
                if mr.ops is None:
                    continue
                skip = VIRTIO_PCI_QUEUE_NOTIFY if mr is m.proxy.bar else -1
                kicks_only = mr is m.proxy.notify.mr  # the modern notify region

                def write(opaque: Any, addr: int, val: int, size: int, _write: Any = mr.ops.write,
                          _skip: int = skip, _kicks_only: bool = kicks_only) -> None:
                    _write(opaque, addr, val, size)
                    if addr != _skip and not _kicks_only:
                        self.save()

                mr.ops = MemoryRegionOps(mr.ops.read, write)
        m.n.on_ctrl_mq = self.save

    # -- -incoming ------------------------------------------------------------------------------

    def cpr_incoming(self) -> None:
        """Take over the device of the QEMU that died: record, rings, KVM, interrupts, kicks."""
        m = self.m
        self.vm_channel_sync()
        try:
            st = json.loads(self.path.read_text())
        except (OSError, ValueError):
            st = None  # died before its first record: the device was never touched
        if st is None or st.get("version") != VMSTATE_VERSION:
            return
        vdev = m.n
        vhost = m.tap is not None and m.tap.vhost_net is not None
        vdev.vm_running = not vhost  # vhost starts when the VM runs, after the state is in
        self.vmstate_load(st)
        self._last = json.dumps(self.vmstate())
        for vq in vdev.vq:
            if vq.packed is not None:
                self.recovered.append(virtio_queue_packed_check_inflights(vq))
            elif vq.views is not None:
                self.recovered.append(virtio_queue_check_inflights(vq))
        if not vdev.status & VIRTIO_CONFIG_S_DRIVER_OK or vdev.broken:
            vdev.vm_running = True
            return
        if vhost:  # virtio_vmstate_change: the kernel's vhost takes the rings from used->idx
            vdev.vm_running = True  # and grabs their ioeventfds before QEMU would poll them
            virtio_net_vhost_status(vdev, vdev.status)
        self.replay_driver_ok()
        for vq in vdev.vq:
            if not virtio_queue_ready(vq):
                continue
            virtio_queue_set_notification(vq, True)
            virtio_notify(vdev, vq)  # signalled_used_valid is off: this raises the interrupt
            if not (m.proxy.ioeventfd_grabbed and vq.host_notifier_enabled):
                virtio_queue_notify_vq(vq)  # a back end's own queue it looks at by itself

    def vmstate_load(self, st: dict[str, Any]) -> None:
        m = self.m
        vdev, dev = m.n, m.proxy.pci_dev
        dev.config[:] = bytes.fromhex(st["pci"]["config"])
        dev.msix_table[:] = bytes.fromhex(st["pci"]["msix_table"])
        m.host.config_reg = st["pci_host"]["config_reg"]
        v = st["virtio"]
        virtio_set_features(vdev, v["guest_features"])
        for n, (vq, q) in enumerate(zip(vdev.vq, v["queues"], strict=False)):
            vq.vector = q["vector"]
            vq.num = q["num"]
            if q["pa"] and m.proxy.modern and vdev.guest_features >> VIRTIO_F_VERSION_1 & 1:
                virtio_queue_set_rings(vdev, n, q["pa"], q["avail"], q["used"])
            elif q["pa"]:
                virtio_queue_set_addr(vdev, n, q["pa"])
        pm = st["virtio_pci_modern"]
        m.proxy.dfselect, m.proxy.gfselect = pm["dfselect"], pm["gfselect"]
        m.proxy.guest_features[:] = pm["guest_features"]
        for q, (num, enabled, desc, avail, used) in zip(m.proxy.vqs, pm["vqs"], strict=False):
            q.num, q.enabled = num, enabled
            q.desc[:], q.avail[:], q.used[:] = desc, avail, used
        vdev.config_vector = v["config_vector"]
        dev.msix_unuse_all_vectors()  # virtio_pci_load_config, virtio_pci_load_queue
        for vector in [vdev.config_vector] + [vq.vector for vq in vdev.vq]:
            dev.msix_vector_use(vector)
        vdev.queue_sel = v["queue_sel"]
        vdev.curr_queue_pairs = st["virtio_net"]["curr_queue_pairs"]
        virtio_net_set_queue_pairs(vdev)
        rx_filter_load(vdev, st["virtio_net"]["rx_filter"])
        virtio_set_status(vdev, v["status"])
        vdev.isr = v["isr"] | (1 if v["status"] & VIRTIO_CONFIG_S_DRIVER_OK else 0)
        if v["broken"]:
            vdev.broken = True
            vdev.broken_reason = v["broken"]
            vdev.status |= VIRTIO_CONFIG_S_NEEDS_RESET

    def replay_driver_ok(self) -> None:
        """DRIVER_OK's set-up again. KVM keeps its registrations and takes identical ones as
        they are (kvmproc/kvm_main.py), so this rebuilds QEMU's side (bridges) and completes
        a set-up a QEMU died in the middle of."""
        self.m.proxy.virtio_pci_start_ioeventfd()

    def vm_channel_sync(self) -> None:
        """Skip the replies to a dead QEMU's VM ioctls: read up to our token's echo."""
        cfg = self.m.rt.cfg
        kvm: KVMState = self.m.kvm
        token = secrets.token_hex(8)
        req, rep = Channel(cfg.channel("vm_req")), Channel(cfg.channel("vm_rep"))
        try:
            req.send([VM_CHANNEL_SYNC, token])
            deadline = time.monotonic() + SYNC_TIMEOUT_S
            while True:
                r = rep.recv(max(0.0, deadline - time.monotonic()))
                if r is None:
                    raise KvmError(f"{VM_CHANNEL_SYNC}: KVM did not answer")
                if r == [0, token]:
                    break
                self.stale_vm_replies += 1
        finally:
            req.close()
            rep.close()
        kvm.ioctls += 1

    # -- the vCPU -------------------------------------------------------------------------------

    def vcpu_resume(self, cpu: CPUState) -> bool:
        """In the vCPU thread, BQL held: map kvm_run again and complete the exit the dead QEMU
        left; False if that exit ended the VM. A first QEMU has nothing to complete."""
        if not self.incoming:
            return True
        cfg = self.m.rt.cfg
        req, exits = Channel(cfg.channel("vcpu_req")), Channel(cfg.channel("vcpu_exit"))
        cpu.bql.release()
        try:
            token = secrets.token_hex(8)
            req.send_raw(packb([KVM_RUN_MMAP, token]))
            while True:
                rec = exits.recv(None)
                if rec and rec[0] == KVM_RUN_MMAP and rec[-1] == token:
                    break
                # a dead QEMU's KVM_RUN came back, or the reply to a KVM_RUN_MMAP of a QEMU
                # that died recovering: neither is ours
                self.stale_exits += 1
        finally:
            cpu.bql.acquire()
            req.close()
            exits.close()
        run = rec[1]
        if run is not None:
            self.replayed_exit = KVM_EXIT_NAMES.get(run[0], "KVM_EXIT_UNKNOWN")
        self.log({"pid": os.getpid(), "replayed_exit": self.replayed_exit,
                  "stale_exits": self.stale_exits})
        if run is None:  # the vCPU never ran
            return True
        kvm_handle_exit(cpu, run)
        return not cpu.shutdown_requested

    def log(self, record: dict[str, Any]) -> None:
        """One line of this incarnation's story in the run's history of QEMUs."""
        try:
            with open(self.path.with_name(HISTORY_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass

    def incoming_record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "restore_ms": round(self.restore_ms, 2),
                "ready_ns": time.monotonic_ns(),
                "stale_vm_replies": self.stale_vm_replies,
                "queues": [vars(r) for r in self.recovered if r.resubmit or r.fixed_up
                           or r.mismatch]}

    def describe(self) -> dict[str, Any]:
        if not self.enabled or self.regions is None:
            return {"enabled": False}
        incarnation, resubmitted = self.regions.counters()
        history: dict[int, dict[str, Any]] = {}
        try:
            for line in self.path.with_name(HISTORY_FILE).read_text().splitlines():
                rec = json.loads(line)
                history.setdefault(rec["pid"], {}).update(rec)
        except (OSError, ValueError, KeyError):
            pass
        return {"enabled": True, "incarnation": incarnation, "restarts": max(0, incarnation - 1),
                "resubmitted": resubmitted, "vmstate_saves": self.saves,
                "incomings": list(history.values())}
