"""kvmproc: KVM for one VM with one vCPU. Usage: python -m kvmproc RUNDIR"""

from __future__ import annotations

import sys
import threading
import time
import traceback

import posix_ipc

from common.channel import Channel
from common.kvm_abi import packb
from common.process import ProcessRuntime, Stop
from common.threads import set_thread_name
from common.trace import register_thread
from kvmproc.kvm_main import Kvm
from kvmproc.monitor import kvm_monitor

STATS_EVERY_S = 0.5
"""With live_stats (stress's progress bar): how often the counters go to the supervisor."""


def vcpu_thread(kvm: Kvm, rt: ProcessRuntime) -> None:
    """Serves QEMU's KVM_RUN ioctls for vCPU 0, one at a time."""
    register_thread("vcpu0")
    set_thread_name("vcpu0")
    req_ch = Channel(rt.cfg.channel("vcpu_req"))
    exit_ch = Channel(rt.cfg.channel("vcpu_exit"))
    try:
        while True:
            req = req_ch.recv()
            assert req is not None
            exit_ch.send(kvm.kvm_vcpu_ioctl(req))
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, then the VM stops
        if not rt.stopping:
            rt.fail(f"vcpu thread: {type(e).__name__}: {e}")
            traceback.print_exc()


def vcpu_destroy(rt: ProcessRuntime) -> None:
    """The VM is gone: the guest CPU's pending (or next) VM exit is answered with shutdown."""
    try:
        Channel(rt.cfg.channel("guest_entry")).send_raw(packb([None, []]), timeout=0.5)
    except posix_ipc.Error:
        pass


def main() -> int:
    rt = ProcessRuntime("kvm", sys.argv[1])
    kvm = Kvm(rt.cfg)
    vhost = None
    fatal: list[str] = []

    def worker_died(why: str) -> None:
        """A vhost worker died under an open device: its rings cannot be served."""
        if not rt.stopping and not fatal:
            fatal.append(why)
            rt.fail(why)

    if rt.cfg.options.get("vhost"):  # modprobe vhost_net: /dev/vhost-net appears
        from kvmproc.vhost_net_misc import VhostNetMisc

        vhost = VhostNetMisc(rt.rundir, set(rt.cfg.semaphores()), rt.cfg.ram, worker_died)
    mon = kvm_monitor(kvm, rt.rundir, vhost)
    threading.Thread(target=vcpu_thread, args=(kvm, rt), name="vcpu0", daemon=True).start()
    vm_req = Channel(rt.cfg.channel("vm_req"))
    vm_rep = Channel(rt.cfg.channel("vm_rep"))
    code = 0
    live_stats = rt.cfg.options.get("live_stats", False)
    next_stats = time.monotonic() + STATS_EVERY_S
    try:
        rt.tell("ready")
        while not kvm.destroyed and not fatal:
            req = vm_req.recv(STATS_EVERY_S)
            if live_stats and time.monotonic() >= next_stats:  # busy with MSIs or idle alike
                next_stats = time.monotonic() + STATS_EVERY_S
                rt.tell("stats", **kvm.stats.as_dict())
            if req is None:
                continue
            vm_rep.send_raw(packb(kvm.kvm_vm_ioctl(req)))
    except Stop:
        pass
    except Exception as e:  # noqa: BLE001
        rt.fail(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        code = 1
    finally:
        kvm.lapic.stop()
        kvm.irqfds.shutdown()
        vcpu_destroy(rt)
        rt.report({**kvm.describe(), **({"vhost": vhost.describe()} if vhost else {})})
        if vhost is not None:
            vhost.close()
        mon.close()
        rt.finish()
    return 1 if fatal else code


if __name__ == "__main__":
    sys.exit(main())
