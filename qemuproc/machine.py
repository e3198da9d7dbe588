"""Stands for hw/i386/pc.c with softmmu/vl.c's machine creation: what QEMU builds from its
command line (address spaces, PCI, the virtio-net-pci NIC, the netdev) and its vCPU thread.

Two threads, as in QEMU: the vCPU thread (``qemu_kvm_cpu_thread_fn`` -> ``kvm_cpu_exec``)
and the main loop (I/O thread), serialized by the Big QEMU Lock.
"""

from __future__ import annotations

import traceback

from common.channel import Channel
from common.guest_memory import GuestMemory
from common.process import ProcessRuntime
from common.threads import set_thread_name
from common.trace import register_thread
from qemuproc.aio import QEMUBH
from qemuproc.cpr import Cpr
from qemuproc.dump import FilterDump
from qemuproc.kvm_all import (
    CPUState,
    KvmIoListener,
    KvmMemoryListener,
    KVMState,
    kvm_cpu_exec,
    qemu_wait_io_event,
)
from qemuproc.main_loop import MainLoop
from qemuproc.memory import AddressSpace
from qemuproc.net import NetClientInfo, NetClientState, qemu_new_net_client, qemu_send_packet
from qemuproc.net_vhost_user import describe as vhost_user_describe
from qemuproc.pci import PCIHostState
from qemuproc.slirp import Slirp, SlirpState, net_slirp_receive
from qemuproc.virtio_net import (
    VirtIONet,
    describe,
    virtio_net_device_init,
    virtio_net_vhost_status,
)
from qemuproc.virtio_pci import VirtIOPCIProxy


class Machine:
    """What QEMU builds from its command line: address spaces, PCI, the NIC, the netdev."""

    def __init__(self, rt: ProcessRuntime, incoming: bool = False) -> None:
        cfg = rt.cfg
        opts = cfg.options
        self.rt = rt
        self.mem = GuestMemory(cfg.ram)
        self.main_loop = ml = MainLoop()
        self.bhs: list[QEMUBH] = []  # other parts' bhs (the monitor's), for info bh
        self.io_as = AddressSpace("I/O", is_io=True)
        self.mem_as = AddressSpace("memory", is_io=False)
        self.kvm = KVMState(Channel(cfg.channel("vm_req")), Channel(cfg.channel("vm_rep")))
        self.io_as.listeners.append(KvmIoListener(self.kvm))
        self.mem_as.listeners.append(KvmMemoryListener(self.kvm))
        self.host = PCIHostState(self.io_as)

        self.tap = None
        self.tap_ncs: list[NetClientState] = []
        self.vhost_user_ncs: list[NetClientState] = []
        if opts.get("netdev") == "tap":
            self._init_tap(opts)
        elif opts.get("netdev") == "vhost-user":
            self._init_vhost_user(opts)
        else:
            self._init_slirp(opts)
        self.dump = None
        if opts.get("pcap"):
            self.dump = FilterDump(opts["pcap"])
            self.netdev.filters.append(self.dump)

        # -device virtio-net-pci,netdev=n0,disable-modern=on,...
        self.n = VirtIONet(self.mem, ml, queue_size=cfg.queue_size, tx=opts.get("tx", "bh"),
                           tx_burst=opts.get("tx_burst", 256),
                           event_idx=opts.get("event_idx", True),
                           mrg_rxbuf=opts.get("mrg_rxbuf", False),
                           any_layout=opts.get("any_layout", True),
                           indirect_desc=opts.get("indirect_desc", True),
                           packed=opts.get("ring") == "packed",
                           queues=opts.get("queues", 1),
                           poll_us=opts.get("poll_us", 0.0),
                           csum=opts.get("csum", True))
        self.n.tx_timeout = opts.get("tx_timer_ns", self.n.tx_timeout)  # x-txtimer
        virtio_net_device_init(self.n, self.tap_ncs or self.vhost_user_ncs or self.netdev)
        for nc in self.n.ncs:
            nc.incoming_queue.nq_maxlen = opts.get("netqueue_maxlen", 10000)
        transport = opts.get("transport", "legacy")  # disable-legacy / disable-modern
        self.proxy = VirtIOPCIProxy(self.n, self.host, self.io_as, self.mem_as, self.kvm, ml, cfg,
                                    opts.get("msix_vectors", 3), opts.get("ioeventfd", True),
                                    disable_legacy=transport == "modern",
                                    disable_modern=transport == "legacy")
        self.proxy.eventfd_notifiers = bool(self.vhost_user_ncs)
        self.n.vhost_bus = self.proxy
        self.cpu = CPUState(Channel(cfg.channel("vcpu_req")), Channel(cfg.channel("vcpu_exit")),
                            ml.bql, self.io_as, self.mem_as)
        self.cpu_error: str | None = None
        self.cpr = Cpr(self, incoming)

    def _init_tap(self, opts: dict) -> None:
        """-netdev tap,id=n0,ifname=tap0,script=no,downscript=no[,sndbuf=N]: QEMU runs in
        the run's network namespace, where the tap is."""
        from common import netns
        from qemuproc.tap import net_init_tap

        netns.enter(opts["netns"])
        self.slirp = None
        self.tap_ncs = net_init_tap(self.main_loop, netns.TAP_NAME, "n0",
                                    sndbuf=opts.get("tap_sndbuf", 0),
                                    vhost_rundir=self.rt.rundir if opts.get("vhost") else None,
                                    poll_us=int(opts.get("poll_us", 0)),
                                    vhost_err_name=self.rt.cfg.vring_err,
                                    queues=opts.get("queues", 1))
        self.netdev = self.tap_ncs[0]
        self.tap = self.netdev.opaque

    def _init_vhost_user(self, opts: dict) -> None:
        """-chardev socket,id=c0,path=SOCK[,server=on,wait=off][,reconnect=S]
        -netdev vhost-user,id=n0,chardev=c0[,queues=N]: the back end is another process."""
        from qemuproc.char_socket import SocketChardev, qmp_chardev_open_socket
        from qemuproc.net_vhost_user import net_vhost_user_init

        c = opts["chardev"]
        self.slirp = None
        self.chardev = SocketChardev(c.get("id", "c0"), c["path"], self.main_loop,
                                     server=bool(c.get("server", False)),
                                     wait=bool(c.get("wait", True)),
                                     reconnect=int(c.get("reconnect", 0)))
        qmp_chardev_open_socket(self.chardev)
        self.vhost_user_ncs = net_vhost_user_init(self.main_loop, self.chardev, "n0",
                                                  opts.get("queues", 1))
        self.netdev = self.vhost_user_ncs[0]

    def _init_slirp(self, opts: dict) -> None:
        ml = self.main_loop
        # -netdev user,id=n0[,hostfwd=udp::H-:G]
        self.slirp = Slirp(self.net_slirp_send_packet,
                           udp_expire_s=opts.get("udp_expire_s", 240.0))
        self.netdev = qemu_new_net_client(NetClientInfo("user", net_slirp_receive), None,
                                          "user", "n0")
        self.netdev.opaque = SlirpState(self.netdev, self.slirp)
        ml.pollfds_fill.append(self.slirp.slirp_pollfds_fill)
        ml.pollfds_poll.append(self.slirp.slirp_pollfds_poll)
        for host_port, guest_port in opts.get("hostfwd", []):
            self.slirp.slirp_add_hostfwd(host_port, guest_port)

    def net_slirp_send_packet(self, frame: bytes, queue: int) -> int:
        """slirp's frames go to the NIC queue pair their flow uses (if that pair is on)."""
        ncs = self.n.ncs
        peer = ncs[queue] if queue < self.n.curr_queue_pairs else ncs[0]
        return qemu_send_packet(self.netdev, frame, peer)

    def bottom_halves(self) -> list[QEMUBH]:
        """The bhs this machine's parts created, for ``info bh`` (QEMU keeps no such list:
        only scheduled bhs sit on a bh_list)."""
        return [self.main_loop.qemu_notify_bh] + [q.tx_bh for q in self.n.vqs if q.tx_bh] \
            + self.bhs

    def vhost_describe(self) -> dict:
        """QEMU's vhost devices, one per queue pair: pair 0's counts, every queue's ring base
        at the last stop, and each pair's own row."""
        devs = [nc.opaque.vhost_net.dev for nc in self.tap_ncs or self.vhost_user_ncs
                if nc.opaque.vhost_net is not None]
        if not devs:
            return {"started": self.n.vhost_started}
        dev = devs[0]
        return {"started": self.n.vhost_started, "starts": dev.starts, "stops": dev.stops,
                "acked_features": hex(dev.acked_features),
                "ioctls": sum(d.backend.calls for d in devs),
                "vring_errors": sum(d.vring_errors for d in devs),
                "ring_bases": {k: v for d in devs for k, v in d.ring_bases.items()},
                "pairs": [{"vq_index": d.vq_index, "started": d.started, "starts": d.starts,
                           "stops": d.stops, "ioctls": d.backend.calls} for d in devs]}

    def vm_shutdown(self) -> None:
        """The VM stops: vhost gives the rings back (virtio_net_vhost_status)."""
        if self.n.vhost_started:
            with self.main_loop.bql:
                self.n.vm_running = False
                virtio_net_vhost_status(self.n, self.n.status)

    def qemu_kvm_cpu_thread_fn(self) -> None:
        register_thread("CPU 0/KVM")
        set_thread_name("CPU 0/KVM")
        ml = self.main_loop
        try:
            with ml.bql:
                if self.cpr.vcpu_resume(self.cpu):
                    while not self.cpu.shutdown_requested:
                        qemu_wait_io_event(self.cpu)
                        kvm_cpu_exec(self.cpu)
        except Exception as e:  # noqa: BLE001 - the VM cannot go on; say why
            if not self.rt.stopping:
                self.cpu_error = f"vCPU thread: {type(e).__name__}: {e}"
                traceback.print_exc()
        finally:
            ml.quit = True  # qemu_system_shutdown_request
            ml.qemu_notify_event()

    def report(self) -> dict:
        vdev = self.n
        return {
            "queues": {vq.name: {"pops": vq.pops, "kicks_handled": vq.kicks,
                                 "kicks_coalesced": vq.kicks_coalesced,
                                 "notifies": vq.notifies, "inuse": vq.inuse,
                                 "last_avail_idx": vq.last_avail_idx, "used_idx": vq.used_idx,
                                 "vector": vq.vector} for vq in vdev.vq},
            "virtio_net": describe(vdev),
            "virtio_pci": self.proxy.describe(),
            "guest_features": vdev.guest_features,
            "status": vdev.status,
            "broken": vdev.broken,
            "errors": vdev.errors,
            **({"slirp": self.slirp.describe()} if self.slirp else {}),
            **({"tap": self.tap.describe()} if self.tap else {}),
            **({"vhost": self.vhost_describe()} if self.tap and self.tap.vhost_net
               or self.vhost_user_ncs else {}),
            **({"vhost_user": vhost_user_describe(self.vhost_user_ncs)}
               if self.vhost_user_ncs else {}),
            "netqueue": {"nic_dropped": sum(nc.incoming_queue.dropped for nc in self.n.ncs),
                         "nic_queued": sum(nc.incoming_queue.queued for nc in self.n.ncs),
                         "nic_flush_dropped": sum(nc.incoming_queue.flush_dropped
                                                  for nc in self.n.ncs),
                         "netdev_dropped": self.netdev.incoming_queue.dropped},
            "kvm_run_exits": self.cpu.exit_counts,
            "main_loop_iterations": self.main_loop.iterations,
            "bh_runs": {bh.name: bh.runs for bh in self.bottom_halves()},
            "aio_notifies": self.main_loop.ctx.notifies,
            "aio_notifier_sets": self.main_loop.ctx.notifier_sets,
            "pcap_frames": self.dump.frames if self.dump else 0,
            "vm_ioctls": self.kvm.ioctls,
            "cpr": self.cpr.describe(),
        }
