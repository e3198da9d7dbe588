"""qemuproc: QEMU with one vCPU, a virtio-net-pci NIC and a netdev (``user``: slirp, or
``tap``, optionally with vhost-net).

Usage: python -m qemuproc [-incoming] RUNDIR   (-incoming: take over from a QEMU that died,
qemuproc/cpr.py)
"""

from __future__ import annotations

import sys
import threading
import traceback

from common.process import ProcessRuntime, Stop
from qemuproc.kvm_all import KvmError
from qemuproc.machine import Machine
from qemuproc.monitor import qemu_monitor
from qemuproc.net_vhost_user import vhost_user_cleanup


def main() -> int:
    rt = ProcessRuntime("qemu", sys.argv[-1])
    code = 0
    m = mon = None
    try:
        m = Machine(rt, incoming="-incoming" in sys.argv[1:-1])
        mon = qemu_monitor(m)  # before the vCPU thread: -S holds its first KVM_RUN
        threading.Thread(target=m.qemu_kvm_cpu_thread_fn, name="CPU 0/KVM", daemon=True).start()
        rt.tell("ready")
        m.main_loop.run()
        if m.cpu_error:
            rt.fail(m.cpu_error)
            code = 1
    except Stop:
        pass
    except Exception as e:  # noqa: BLE001
        rt.fail(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        code = 1
    finally:
        if m is not None:
            try:
                m.vm_shutdown()
                rt.report(m.report())
                if m.dump:
                    m.dump.close()
                if not rt.stopping:
                    m.kvm.kvm_destroy_vm()
            except (KvmError, OSError, Stop):
                pass
            if m.slirp is not None:
                m.slirp.cleanup()
            if m.vhost_user_ncs:
                vhost_user_cleanup(m.vhost_user_ncs)
        if mon is not None:
            mon.close()
        rt.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
