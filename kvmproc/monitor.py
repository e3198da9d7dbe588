"""The KVM process's monitor: kvm_stat's counters, the ioeventfd and irqfd tables, vCPU 0's
state, and KVM_NMI. ``stop``/``cont``/``step`` hold vCPU 0 before its next guest entry: one
step is one entry, one VM exit, and its handling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.kvm_abi import KVM_EXIT_NAMES, KVM_IRQ_ROUTING_MSI
from common.monitor import Monitor, MonitorError, Reply, format_human
from kvmproc.kvm_main import Kvm
from kvmproc.lapic import HALTED, MODE_NAMES


def kvm_monitor(kvm: Kvm, rundir: str | Path) -> Monitor:
    """Build and start the monitor of ``kvm``."""
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

    @mon.command("info kvm", "", "show KVM's counters (kvm_stat) and the VM's state")
    def info_kvm(args: list[str]) -> Reply:
        d = {"enabled": True, "present": True, **kvm.describe(), "destroyed": kvm.destroyed}
        rows = [(k, v) for k, v in d["vcpu"].items()]
        rows += [(k, v) for k, v in d["userspace_exits"].items() if v]
        width = max(len(k) for k, _ in rows)
        lines = ["kvm support: enabled", f" {'Event':<{width}}  {'Total':>10}"]
        lines += [f" {k:<{width}}  {v:>10}" for k, v in rows]
        lines.append(f"vcpu0: {d['vcpu_mode']}, IRR {d['lapic']['irr']}, ISR "
                     f"{d['lapic']['isr']}, {d['ipis']} IPIs, {d['eois']} EOIs, "
                     f"{d['apic_timer_fires']} APIC timer interrupts")
        return Reply(d, "\n".join(lines))

    @mon.command("info ioeventfd", "", "show the ioeventfds on the PIO and MMIO buses")
    def info_ioeventfd(args: list[str]) -> Reply:
        rows = kvm.bus.describe()
        text = "\n".join(
            f"{r['bus']} 0x{r['addr']:x}+{r['len']} datamatch="
            f"{'any' if r['datamatch'] is None else r['datamatch']} -> {r['eventfd']} "
            f"({r['signals']} signals)" for r in rows) or "no ioeventfds"
        return Reply(rows, text)

    @mon.command("info irqfd", "", "show the irqfds and the GSI routes they inject")
    def info_irqfd(args: list[str]) -> Reply:
        rows = kvm.irqfds.describe()
        routes = {gsi: {"type": "msi" if kind == KVM_IRQ_ROUTING_MSI else "irqchip",
                        "value": b, "address": a}
                  for gsi, (kind, a, b) in kvm.routing.routes.items()}

        def route(gsi: int) -> str:
            r = routes.get(gsi)
            if r is None:
                return "no route"
            if r["type"] == "msi":
                return f"msi address {r['address']:#x} data {r['value']:#x}"
            return f"irqchip pin {r['value']}"

        text = "\n".join(f"gsi {r['gsi']} <- {r['eventfd']}: {route(r['gsi'])}, "
                         f"{r['signals']} signals" for r in rows) or "no irqfds"
        return Reply({"irqfds": rows, "routes": routes}, text)

    @mon.command("info vcpu", "", "show vCPU 0: mode, pending vectors, last exit to user space")
    def info_vcpu(args: list[str]) -> Reply:
        d = {**vcpu_state(), "gate": vcpu.gate.describe(), "stats": dict(kvm.stats.vcpu)}
        return Reply(d, format_human(d))

    @mon.command("nmi", "", "inject an NMI into vCPU 0 (KVM_NMI): wakes it from HLT")
    def nmi(args: list[str]) -> Reply:
        if kvm.destroyed:
            raise MonitorError("the VM is destroyed")
        nmis[0] += 1
        lapic.kvm_inject_nmi()
        return Reply({}, "")

    mon.start()
    return mon
