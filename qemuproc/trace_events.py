"""Stands for QEMU 7.2's trace-events files (hw/virtio, hw/net, hw/intc, accel/kvm, softmmu,
monitor):
each event this project writes or reads under a QEMU name, its arguments and its format.

An event recorded under one of these names carries exactly these arguments; the log writer
prints it with QEMU's format (``vreplica.trace.tracelog``), and the log reader parses a real
QEMU log with the same table. ``%p`` arguments are addresses: QEMU prints them ``0x...``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple


class QemuEvent(NamedTuple):
    """One line of a trace-events file: ``name(args) "format"``."""

    args: tuple[str, ...]
    fmt: str


QEMU_EVENTS: dict[str, QemuEvent] = {
    # hw/virtio/trace-events (virtio.c, virtio-pci.c)
    "virtqueue_alloc_element": QemuEvent(("elem", "sz", "in_num", "out_num"),
                                         "elem %p size %zd in_num %u out_num %u"),
    "virtqueue_fill": QemuEvent(("vq", "elem", "len", "idx"), "vq %p elem %p len %u idx %u"),
    "virtqueue_flush": QemuEvent(("vq", "count"), "vq %p count %u"),
    "virtqueue_pop": QemuEvent(("vq", "elem", "in_num", "out_num"),
                               "vq %p elem %p in_num %u out_num %u"),
    "virtio_queue_notify": QemuEvent(("vdev", "n", "vq"), "vdev %p n %d vq %p"),
    "virtio_notify_irqfd": QemuEvent(("vdev", "vq"), "vdev %p vq %p"),
    "virtio_notify": QemuEvent(("vdev", "vq"), "vdev %p vq %p"),
    "virtio_set_status": QemuEvent(("vdev", "val"), "vdev %p val %u"),
    "virtio_pci_notify_write": QemuEvent(("addr", "val", "size"), "0x%lx = 0x%lx (%d)"),
    "virtio_pci_notify_write_pio": QemuEvent(("addr", "val", "size"), "0x%lx = 0x%lx (%d)"),
    # accel/kvm/trace-events (kvm-all.c)
    "kvm_ioctl": QemuEvent(("type", "arg"), "type 0x%x, arg %p"),
    "kvm_vm_ioctl": QemuEvent(("type", "arg"), "type 0x%x, arg %p"),
    "kvm_vcpu_ioctl": QemuEvent(("cpu_index", "type", "arg"), "cpu_index %d, type 0x%x, arg %p"),
    "kvm_run_exit": QemuEvent(("cpu_index", "reason"), "cpu_index %d, reason %d"),
    "kvm_irqchip_commit_routes": QemuEvent((), ""),
    "kvm_irqchip_add_msi_route": QemuEvent(("name", "vector", "virq"), "dev %s vector %d virq %d"),
    "kvm_irqchip_update_msi_route": QemuEvent(("virq",), "Updating MSI route virq=%d"),
    "kvm_irqchip_release_virq": QemuEvent(("virq",), "virq %d"),
    "kvm_set_ioeventfd_pio": QemuEvent(("fd", "addr", "val", "assign", "size", "datamatch"),
                                       "fd: %d @0x%x val=0x%x assign: %d size: %d match: %d"),
    "kvm_set_ioeventfd_mmio": QemuEvent(("fd", "addr", "val", "assign", "size", "datamatch"),
                                        "fd: %d @0x%lx val=0x%x assign: %d size: %d match: %d"),
    # hw/intc/trace-events (apic.c, ioapic.c, i8259.c): what TCG logs where KVM injects
    "apic_deliver_irq": QemuEvent(("dest", "dest_mode", "delivery_mode", "vector_num",
                                   "trigger_mode"),
                                  "dest %d dest_mode %d delivery_mode %d vector %d "
                                  "trigger_mode %d"),
    "ioapic_set_irq": QemuEvent(("vector", "level"), "vector: %d level: %d"),
    "pic_set_irq": QemuEvent(("master", "irq", "level"), "master %d irq %d level %d"),
    # monitor/trace-events (qmp.c)
    "handle_qmp_command": QemuEvent(("mon", "req"), "mon %p req: %s"),
    "monitor_qmp_cmd_in_band": QemuEvent(("id",), "%s"),
    "monitor_qmp_respond": QemuEvent(("mon", "json"), "mon %p resp: %s"),
    # softmmu/trace-events (memory.c)
    "memory_region_ops_write": QemuEvent(("cpu_index", "mr", "addr", "value", "size", "name"),
                                         "cpu %d mr %p addr 0x%lx value 0x%lx size %u "
                                         "name '%s'"),
}

_CONV = re.compile(r"%(-?\d*)(?:z|l|ll|h|hh)?([dupxXsc])")


def pointer_args(name: str) -> tuple[str, ...]:
    """The arguments of QEMU event ``name`` that are addresses (``%p``)."""
    ev = QEMU_EVENTS.get(name)
    if ev is None:
        return ()
    return tuple(a for a, c in zip(ev.args, _CONV.findall(ev.fmt), strict=False) if c[1] == "p")


def hexaddr(value: Any) -> str:
    """An address as QEMU's %p prints it."""
    if isinstance(value, str):
        return value
    return "(nil)" if not value else f"0x{value:x}"


def format_event(name: str, args: dict[str, Any]) -> str | None:
    """QEMU's text for the event (what follows ``name `` in its log), or None if ``args``
    are not exactly the event's."""
    ev = QEMU_EVENTS.get(name)
    if ev is None or set(args) != set(ev.args):
        return None
    out: list[str] = []
    pos = 0
    try:
        for m, a in zip(_CONV.finditer(ev.fmt), ev.args, strict=False):
            out.append(ev.fmt[pos:m.start()].replace("%%", "%"))
            v = args[a]
            kind = m.group(2)
            if kind == "p":
                out.append(hexaddr(v))
            elif kind in "xX":
                out.append(format(int(v) & (2**64 - 1), kind))
            elif kind == "s":
                out.append(str(v))
            else:
                out.append(str(int(v)))
            pos = m.end()
    except (TypeError, ValueError):  # a value of another type than QEMU's: not its event
        return None
    out.append(ev.fmt[pos:])
    return "".join(out)


def _pattern(fmt: str) -> re.Pattern[str]:
    parts: list[str] = []
    pos = 0
    for m in _CONV.finditer(fmt):
        parts.append(re.escape(fmt[pos:m.start()]))
        kind = m.group(2)
        parts.append({"p": r"(0x[0-9a-fA-F]+|\(nil\))", "x": "([0-9a-fA-F]+)",
                      "X": "([0-9a-fA-F]+)", "s": "(.*?)", "c": "(.)"}.get(kind, r"(-?\d+)"))
        pos = m.end()
    parts.append(re.escape(fmt[pos:]))
    return re.compile("".join(parts) + r"\s*$")


_PATTERNS = {name: _pattern(ev.fmt) for name, ev in QEMU_EVENTS.items()}


def parse_event(name: str, text: str) -> dict[str, Any]:
    """The arguments of one logged event: by QEMU's format when the name is known (addresses
    as ``0x...`` strings, numbers as ints), else ``key value`` pairs as they come."""
    ev = QEMU_EVENTS.get(name)
    if ev is not None:
        m = _PATTERNS[name].match(text)
        if m is not None:
            out: dict[str, Any] = {}
            for a, conv, v in zip(ev.args, _CONV.findall(ev.fmt), m.groups(), strict=False):
                kind = conv[1]
                if kind in "xX":
                    out[a] = int(v, 16)
                elif kind in "dui":
                    out[a] = int(v)
                else:
                    out[a] = v
            return out
    words = text.replace(",", " ").split()
    pairs: dict[str, Any] = {}
    for k, v in zip(words[::2], words[1::2], strict=False):
        k = k.rstrip(":=")
        try:
            pairs[k] = int(v, 0) if not v.startswith("0x") else v
        except ValueError:
            pairs[k] = v.strip("'")
    return pairs
