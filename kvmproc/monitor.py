"""The KVM process's monitor: kvm_stat's counters, the ioeventfd and irqfd tables, vCPU 0's
state, and KVM_NMI. ``stop``/``cont``/``step`` hold vCPU 0 before its next guest entry: one
step is one entry, one VM exit, and its handling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.kvm_abi import KVM_EXIT_NAMES, KVM_IRQ_ROUTING_MSI
from common.monitor.commands import MonitorError
from common.monitor.hmp import format_human
from common.monitor.monitor import Monitor
from kvmproc.kvm_main import Kvm
from kvmproc.lapic import HALTED, MODE_NAMES


def kvm_monitor(kvm: Kvm, rundir: str | Path, vhost: Any = None) -> Monitor:
    """Build and start the monitor of ``kvm`` (and of its vhost-net devices, if any)."""
    mon = Monitor("kvm", rundir)
    vcpu = kvm.vcpu
    lapic = kvm.lapic
    mon.gates.append(vcpu.gate)
    mon.step_gate = vcpu.gate
    mon.stats = kvm.describe
    nmis = [0]

    def vcpu_state() -> dict[str, Any]:
        last = vcpu.last_exit
        return {
            "mode": MODE_NAMES[lapic.mode],
            "halted": lapic.mode == HALTED,
            "mp_state": "halted" if vcpu.mp_state else "runnable",
            **lapic.describe(),
            "last_userspace_exit": KVM_EXIT_NAMES.get(last[0]) if last else None,
            "complete_userspace_io": vcpu.complete_userspace_io,
            "tsc_deadline": lapic.tsc_deadline,
            "apic_timer_armed": lapic.timer_armed(),
            "ipis": lapic.ipis,
            "nmis_injected": nmis[0],
        }

    mon.status_info = lambda: {"vcpu0": MODE_NAMES[lapic.mode], **lapic.describe()}

    def info_kvm_text(d: dict[str, Any]) -> str:
        rows = [(k, v) for k, v in d["vcpu"].items()]
        rows += [(k, v) for k, v in d["userspace_exits"].items() if v]
        width = max(len(k) for k, _ in rows)
        lines = ["kvm support: enabled", f" {'Event':<{width}}  {'Total':>10}"]
        lines += [f" {k:<{width}}  {v:>10}" for k, v in rows]
        lines.append(f"vcpu0: {d['vcpu_mode']}, IRR {d['lapic']['irr']}, ISR "
                     f"{d['lapic']['isr']}, {d['ipis']} IPIs, {d['eois']} EOIs, "
                     f"{d['apic_timer_fires']} APIC timer interrupts")
        return "\n".join(lines)

    @mon.command(hmp="info kvm", qmp=False, human=info_kvm_text,
                 help="show KVM's counters (kvm_stat) and the VM's state")
    def info_kvm() -> dict[str, Any]:
        return {"enabled": True, "present": True, **kvm.describe(), "destroyed": kvm.destroyed}

    @mon.command(hmp="info ioeventfd", qmp=False,
                 human=lambda rows: "\n".join(
                     f"{r['bus']} 0x{r['addr']:x}+{r['len']} datamatch="
                     f"{'any' if r['datamatch'] is None else r['datamatch']} -> {r['eventfd']} "
                     f"({r['signals']} signals)" for r in rows) or "no ioeventfds",
                 help="show the ioeventfds on the PIO and MMIO buses")
    def info_ioeventfd() -> list[dict[str, Any]]:
        return kvm.bus.describe()

    register_irqfd_info(mon, kvm)

    @mon.command(hmp="info vcpu", qmp=False, human=format_human,
                 help="show vCPU 0: mode, pending vectors, last exit to user space")
    def info_vcpu() -> dict[str, Any]:
        return {**vcpu_state(), "gate": vcpu.gate.describe(), "stats": dict(kvm.stats.vcpu)}

    @mon.command("inject-nmi", hmp="nmi",
                 help="inject an NMI into vCPU 0 (KVM_NMI): wakes it from HLT")
    def nmi() -> None:
        if kvm.destroyed:
            raise MonitorError("the VM is destroyed")
        nmis[0] += 1
        lapic.kvm_inject_nmi()

    register_vhost_info(mon, vhost)
    mon.start()
    return mon


def register_irqfd_info(mon: Monitor, kvm: Kvm) -> None:
    """``info irqfd``: the irqfds and the GSI routes they inject."""

    def info_irqfd_text(d: dict[str, Any]) -> str:
        routes = d["routes"]

        def route(gsi: int) -> str:
            r = routes.get(gsi)
            if r is None:
                return "no route"
            if r["type"] == "msi":
                return f"msi address {r['address']:#x} data {r['value']:#x}"
            return f"irqchip pin {r['value']}"

        return "\n".join(f"gsi {r['gsi']} <- {r['eventfd']}: {route(r['gsi'])}, "
                         f"{r['signals']} signals" for r in d["irqfds"]) or "no irqfds"

    @mon.command(hmp="info irqfd", qmp=False, human=info_irqfd_text,
                 help="show the irqfds and the GSI routes they inject")
    def info_irqfd() -> dict[str, Any]:
        routes = {gsi: {"type": "msi" if kind == KVM_IRQ_ROUTING_MSI else "irqchip",
                        "value": b, "address": a}
                  for gsi, (kind, a, b) in kvm.routing.routes.items()}
        return {"irqfds": kvm.irqfds.describe(), "routes": routes}


def register_vhost_info(mon: Monitor, vhost: Any) -> None:
    """``info vhost``: the vhost-net devices, their workers and rings."""

    def info_vhost_text(d: dict[str, Any]) -> str:
        lines = []
        for dev in d["open"]:
            lines.append(f"vhost-net: owner pid {dev['owner']}, worker {dev['worker']} "
                         f"(pid {dev.get('worker_pid')}), "
                         f"features {dev['features']}, {dev['works_run']} works run")
            for q in dev["vqs"]:
                lines.append(f"  vq {q['index']} ({'rx' if q['index'] == 0 else 'tx'}): "
                             f"num {q['num']} last_avail_idx {q['last_avail_idx']} "
                             f"last_used_idx {q['last_used_idx']}, backend fd {q['backend']}, "
                             f"{q['packets']} packets in {q['batches']} batches, "
                             f"{q['signals']} signals ({q['signals_suppressed']} suppressed), "
                             f"kick {q['kick']} call {q['call']}, "
                             f"busyloop {q['busyloop_timeout_us']} us"
                             + (f", error: {q['last_error']}" if q["last_error"] else ""))
        return "\n".join(lines) or "no open vhost-net device"

    @mon.command(hmp="info vhost", qmp=False, human=info_vhost_text,
                 help="show the vhost-net devices: worker, rings, batches")
    def info_vhost() -> dict[str, Any]:
        if vhost is None:
            raise MonitorError("no vhost-net device (the run has no --vhost on)")
        return vhost.describe()
