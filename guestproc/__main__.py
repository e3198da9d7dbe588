"""guestproc: boot the guest kernel on its vCPU, probe virtio-net, run the program, power off.

Usage: python -m guestproc RUNDIR
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

from common import kvm_abi
from common.channel import Channel
from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.process import ProcessRuntime, Stop
from guestproc.cpu import GuestShutdown, VCpu
from guestproc.dev_addr_lists import dev_open
from guestproc.faults import FaultInjector
from guestproc.kernel import Kernel
from guestproc.mm import PageAllocator
from guestproc.monitor import GuestMonitor
from guestproc.netstack import GuestStack
from guestproc.programs import FAULT_REQUESTS, PROGRAMS
from guestproc.virtio_net import virtio_net_driver
from guestproc.virtio_pci_common import virtio_pci_probe

SLIRP_GATEWAY_MAC = bytes.fromhex("52550a000202")
TX_DRAIN_TIMEOUT_S = 10.0


def boot(rt: ProcessRuntime, mon: GuestMonitor) -> dict:
    cfg = rt.cfg
    opts = cfg.options
    mem = GuestMemory(cfg.ram)
    cpu = VCpu(Channel(cfg.channel("guest_exit")), Channel(cfg.channel("guest_entry")),
               EventNotifier(cfg.kick))
    mon.attach_cpu(cpu, mem.ram)
    (rt.rundir / kvm_abi.VCPU_PID_FILE).write_text(str(os.getpid()))  # where the IPIs go
    # the vCPU starts running when QEMU first calls KVM_RUN: wait for that first VM entry
    if not cpu.power_on():
        raise GuestShutdown
    kernel = Kernel(cpu)
    pages = PageAllocator(mem.size)
    vdev = virtio_pci_probe(cpu, kernel, mem.ram, pages, virtio_net_driver)
    vi = vdev.priv
    neigh = {} if opts.get("arp", True) else {"10.0.2.2": SLIRP_GATEWAY_MAC}
    stack = GuestStack(kernel, mem.ram, vi.dev, vi.skb_pool, static_neigh=neigh)
    vi.rx_handler = stack.netif_receive_skb
    dev_open(vi.dev)  # ip link set eth0 up
    fault = FaultInjector(vi, opts["guest_fault"]) if opts.get("guest_fault") else None
    mon.attach(kernel, vdev, stack)
    result = PROGRAMS[opts["mode"]](kernel, stack, opts,
                                    lambda line: rt.tell("console", line=line))
    mon.run_requests()
    # done when the device has used every frame, those still waiting for ARP included
    drained = kernel.wait_event(lambda: not stack.arp_queue
                                and all(q.vq.num_free == q.vq.num for q in vi.sq),
                                TX_DRAIN_TIMEOUT_S)
    if not drained:
        vi.dev.stats["tx_timeouts"] = 1
    report = {
        "program": result,
        "features": vdev.features,
        "transport": vdev.transport,
        "interrupt_mode": "msix-per-vq" if vdev.per_vq_vectors else
        ("msix-shared" if vdev.msix_enabled else "intx"),
        "msix_names": vdev.msix_names,
        "netdev": vi.dev.stats,
        "stack": stack.counters,
        "queue_pairs": vi.curr_queue_pairs,
        "sq": [dict(q.stats, num_free=q.vq.num_free, interrupts=q.vq.interrupts,
                    indirect=q.vq.indirect_adds) for q in vi.sq],
        "rq": [dict(q.stats, num_free=q.vq.num_free, interrupts=q.vq.interrupts) for q in vi.rq],
        "irqs": kernel.irq_count,
        "isr_reads": vdev.isr_reads,
        "vm_exits": cpu.exits,
        "tx_drained": drained,
        "resets": vi.resets,
        "ctrl_failures": vi.ctrl_failures,
        "sent_by_monitor": mon.sent,
        "timer_interrupts": kernel.timer_interrupts,
        "reset_log": vi.reset_log,
    }
    if vi.reset_error:
        report["reset_error"] = vi.reset_error
    if fault is not None:
        report["fault"] = fault.describe()
    if opts.get("hold"):
        mon.hold(report)  # until the host destroys the VM
    cpu.triple_fault()  # power off: KVM reports KVM_EXIT_SHUTDOWN to QEMU
    return report


def main() -> int:
    rt = ProcessRuntime("guest", sys.argv[1])
    signal.signal(signal.SIGUSR1, lambda signum, frame: FAULT_REQUESTS.append(signum))
    mon = GuestMonitor(rt)
    code = 0
    try:
        report = boot(rt, mon)
        rt.report(report)
        rt.tell("done")
    except (Stop, GuestShutdown):  # SIGTERM, or the host destroyed the VM (quit)
        code = 0
    except Exception as e:  # a guest kernel oops: say what and where, then stop
        rt.fail(f"guest kernel panic: {type(e).__name__}: {e}")
        traceback.print_exc()
        code = 1
    finally:
        signal.signal(kvm_abi.SIG_VCPU_KICK, signal.SIG_IGN)  # a late IPI must not kill us
        mon.close()
        rt.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
