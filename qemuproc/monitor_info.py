"""Stands for the ``info`` commands QEMU keeps beside their subsystems: hmp_info_pci over
qmp_query_pci (monitor/hmp-cmds.c, hw/pci/pci.c), ``info qtree`` (softmmu/qdev-monitor.c),
``info mtree`` (softmmu/memory.c's mtree_info), ``info network`` (net/net.c), and two the
replica adds for its main loop: ``info bh`` and ``info iohandlers``.

The device tree, the PCI function and the memory map shown are the replica's own objects
(qemuproc/pci.py, virtio_pci.py, memory.py, virtio_net.py), printed in QEMU 7.2's formats.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from qemuproc.aio import bh_flag_names
from qemuproc.pci import (
    MSIX_PBA_OFFSET,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
)
from qemuproc.virtio_pci import VIRTIO_PCI_MSIX_BAR_ADDR
from qemuproc.virtio_qmp import VIRTIO_PATH

if TYPE_CHECKING:
    from common.monitor.monitor import Monitor
    from qemuproc.machine import Machine

PCI_CLASS_NAMES = {0x0200: "Ethernet controller"}
MSIX_BAR_SIZE = 0x1000
MTREE_INDENT = "  "
Locked = Callable[[], AbstractContextManager[None]]


# -- info pci / query-pci -----------------------------------------------------------------------


def pci_regions(m: Machine) -> list[dict[str, Any]]:
    """The function's BARs: the legacy virtio I/O BAR, the MSI-X table's BAR, and the modern
    BAR (64-bit prefetchable), those the device has."""
    regions: list[dict[str, Any]] = []
    for n, (addr, size, bits) in sorted(m.proxy.pci_dev.bars.items()):
        if bits & PCI_BASE_ADDRESS_SPACE_IO:
            regions.append({"bar": n, "type": "io", "address": addr, "size": size})
        else:
            regions.append({"bar": n, "type": "memory", "address": addr, "size": size,
                            "prefetch": bool(bits & PCI_BASE_ADDRESS_MEM_PREFETCH),
                            "mem_type_64": bool(bits & PCI_BASE_ADDRESS_MEM_TYPE_64)})
    return regions


CAP_NAMES = {0x11: "MSI-X", 0x09: "Vendor Specific"}
VIRTIO_CAP_NAMES = {1: "common", 2: "notify", 3: "isr", 4: "device", 5: "pci-cfg"}


def pci_capabilities(m: Machine) -> list[str]:
    """The capability list, lspci's way ("[98] MSI-X"), with each virtio structure's kind."""
    dev = m.proxy.pci_dev
    out = []
    for pos, cap_id in dev.capabilities():
        name = CAP_NAMES.get(cap_id, f"id {cap_id:#x}")
        if cap_id == 0x09:
            kind = VIRTIO_CAP_NAMES.get(dev.config[pos + 3], "?")
            name += f" (virtio {kind}, BAR{dev.config[pos + 4]})"
        out.append(f"[{pos:02x}] {name}")
    return out


def qmp_query_pci(m: Machine) -> list[dict[str, Any]]:
    devices = []
    for devfn, dev in sorted(m.host.devices.items()):
        c = dev.config
        cls = int.from_bytes(c[0x0A:0x0C], "little")
        info: dict[str, Any] = {
            "bus": 0, "slot": devfn >> 3, "function": devfn & 7,
            "class_info": {"class": cls, **({"desc": PCI_CLASS_NAMES[cls]}
                                            if cls in PCI_CLASS_NAMES else {})},
            "id": {"vendor": int.from_bytes(c[0:2], "little"),
                   "device": int.from_bytes(c[2:4], "little"),
                   "subsystem-vendor": int.from_bytes(c[0x2C:0x2E], "little"),
                   "subsystem": int.from_bytes(c[0x2E:0x30], "little")},
            "irq_pin": c[0x3D], "qdev_id": "", "regions": pci_regions(m),
            "capabilities": pci_capabilities(m),
        }
        if c[0x3D]:
            info["irq"] = c[0x3C]
        devices.append(info)
    return [{"bus": 0, "devices": devices}]


def hmp_info_pci(buses: list[dict[str, Any]]) -> str:
    lines = []
    for bus in buses:
        for d in bus["devices"]:
            lines.append(f"  Bus {d['bus']:2d}, device {d['slot']:3d}, function "
                         f"{d['function']}:")
            ci, ident = d["class_info"], d["id"]
            desc = ci.get("desc", f"Class {ci['class']:04d}")
            lines.append(f"    {desc}: PCI device "
                         f"{ident['vendor']:04x}:{ident['device']:04x}")
            lines.append(f"      PCI subsystem {ident['subsystem-vendor']:04x}:"
                         f"{ident['subsystem']:04x}")
            if "irq" in d:
                lines.append(f"      IRQ {d['irq']}, pin {chr(ord('A') + d['irq_pin'] - 1)}")
            for r in d["regions"]:
                a, end = r["address"], r["address"] + r["size"] - 1
                if r["type"] == "io":
                    lines.append(f"      BAR{r['bar']}: I/O at 0x{a:04x} [0x{end:04x}].")
                else:
                    lines.append(f"      BAR{r['bar']}: {64 if r['mem_type_64'] else 32} bit"
                                 f"{' prefetchable' if r['prefetch'] else ''} memory at "
                                 f"0x{a:08x} [0x{end:08x}].")
            if d.get("capabilities"):
                lines.append(f"      Capabilities: {', '.join(d['capabilities'])}")
            lines.append(f"      id \"{d['qdev_id']}\"")
    return "\n".join(lines)


# -- info qtree ---------------------------------------------------------------------------------


def _prop(value: Any) -> str:
    """object_property_print, human: bools bare, integers with their hex, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value} (0x{value:x})"
    return f'"{value}"'


def qtree(m: Machine) -> dict[str, Any]:
    """The device tree, as nested buses and devices with their properties."""
    opts = m.rt.cfg.options
    n, proxy = m.n, m.proxy
    dev = proxy.pci_dev
    pci_props = {"ioeventfd": proxy.ioeventfd, "vectors": dev.msix_entries_nr,
                 "virtio-pci-bus-master-bug-migration": False,
                 "disable-legacy": "auto" if proxy.legacy else "on",
                 "disable-modern": not proxy.modern,
                 "addr": f"{dev.devfn >> 3:02x}.{dev.devfn & 7}",
                 "romfile": "", "rombar": 1, "multifunction": False}
    net_props = {"csum": False, "guest_csum": False, "mac": n.mac.hex(":"), "netdev": "n0",
                 "mrg_rxbuf": bool(opts.get("mrg_rxbuf", False)),
                 "event_idx": bool(opts.get("event_idx", True)),
                 "indirect_desc": bool(opts.get("indirect_desc", True)),
                 "any_layout": bool(opts.get("any_layout", True)),
                 "packed": opts.get("ring") == "packed",
                 "mq": n.max_queue_pairs > 1, "ctrl_vq": n.max_queue_pairs > 1,
                 "x-txtimer": n.tx_timeout, "x-txburst": n.tx_burst, "tx": n.tx,
                 "rx_queue_size": n.queue_size, "tx_queue_size": n.queue_size}
    regions = pci_regions(m)
    cls = int.from_bytes(dev.config[0x0A:0x0C], "little")
    ident = (int.from_bytes(dev.config[0:2], "little"), int.from_bytes(dev.config[2:4], "little"),
             int.from_bytes(dev.config[0x2C:0x2E], "little"),
             int.from_bytes(dev.config[0x2E:0x30], "little"))
    return {"bus": "main-system-bus", "type": "System", "devices": [{
        "dev": "i440FX-pcihost", "id": "", "props": {}, "buses": [{
            "bus": "pci.0", "type": "PCI", "devices": [{
                "dev": "virtio-net-pci", "id": "", "props": pci_props,
                "pci": {"class": PCI_CLASS_NAMES.get(cls, "Class"), "devfn": dev.devfn,
                        "id": ident, "bars": regions},
                "buses": [{"bus": "virtio-bus", "type": "virtio-pci-bus", "devices": [{
                    "dev": "virtio-net-device", "id": "", "path": VIRTIO_PATH,
                    "props": net_props, "buses": []}]}]}]}]}]}


def hmp_info_qtree(tree: dict[str, Any]) -> str:
    """qbus_print / qdev_print, with pcibus_dev_print's lines for a PCI function."""
    lines: list[str] = []

    def bus(b: dict[str, Any], indent: int) -> None:
        lines.append(f"{' ' * indent}bus: {b['bus']}")
        lines.append(f"{' ' * (indent + 2)}type {b['type']}")
        for d in b["devices"]:
            device(d, indent + 2)

    def device(d: dict[str, Any], indent: int) -> None:
        pad = " " * (indent + 2)
        lines.append(f"{' ' * indent}dev: {d['dev']}, id \"{d['id']}\"")
        for k, v in d["props"].items():
            lines.append(f"{pad}{k} = {v if k == 'addr' else _prop(v)}")
        pci = d.get("pci")
        if pci:
            vendor, device_id, svendor, sdevice = pci["id"]
            lines.append(f"{pad}class {pci['class']}, addr 00:{pci['devfn'] >> 3:02x}."
                         f"{pci['devfn'] & 7:x}, pci id {vendor:04x}:{device_id:04x} "
                         f"(sub {svendor:04x}:{sdevice:04x})")
            for r in pci["bars"]:
                lines.append(f"{pad}bar {r['bar']}: {'i/o' if r['type'] == 'io' else 'mem'} "
                             f"at 0x{r['address']:x} [0x{r['address'] + r['size'] - 1:x}]")
        for b in d["buses"]:
            bus(b, indent + 2)

    bus(tree, 0)
    return "\n".join(lines)


# -- info mtree ---------------------------------------------------------------------------------


def mtree(m: Machine) -> list[dict[str, Any]]:
    """The address spaces as region trees: guest RAM and the MSI-X BAR in ``memory``, the
    PCI host's ports and the virtio BAR in ``I/O``, each region with its ioeventfds."""
    def region(name: str, base: int, size: int, kind: str = "i/o", prio: int = 0,
               subregions: list | None = None, ioeventfds: list | None = None) -> dict:
        return {"name": name, "addr": base, "size": size, "type": kind, "priority": prio,
                "subregions": subregions or [], "ioeventfds": ioeventfds or []}

    def eventfds(mr: Any) -> list[dict[str, Any]]:
        return [{"addr": mr.base + e.addr, "size": e.size,
                 "datamatch": e.data if e.match_data else None, "eventfd": e.notifier}
                for e in mr.ioeventfds]

    system = [region("pc.ram", 0, m.mem.size, "ram")]
    for mr in m.mem_as.regions:
        subs = []
        if mr.base == VIRTIO_PCI_MSIX_BAR_ADDR:
            nr = m.proxy.pci_dev.msix_entries_nr
            subs = [region("msix-table", mr.base, nr * 16),
                    region("msix-pba", mr.base + MSIX_PBA_OFFSET, ((nr + 63) // 64) * 8)]
        system.append(region(mr.name, mr.base, mr.size, prio=1, subregions=subs,
                             ioeventfds=eventfds(mr)))
    io = [region(mr.name, mr.base, mr.size, prio=1 if mr is m.proxy.bar else 0,
                 ioeventfds=eventfds(mr)) for mr in m.io_as.regions]
    return [{"address-space": "memory",
             "root": region("system", 0, 1 << 64, subregions=sorted(system,
                                                                     key=lambda r: r["addr"]))},
            {"address-space": "I/O",
             "root": region("io", 0, 0x10000, subregions=sorted(io, key=lambda r: r["addr"]))}]


def hmp_info_mtree(spaces: list[dict[str, Any]]) -> str:
    """mtree_print_mr's lines; a region's ioeventfds follow it, one line each."""
    lines: list[str] = []

    def mr(r: dict[str, Any], level: int) -> None:
        pad = MTREE_INDENT * level
        lines.append(f"{pad}{r['addr']:016x}-{r['addr'] + r['size'] - 1:016x} "
                     f"(prio {r['priority']}, {r['type']}): {r['name']}")
        for e in r["ioeventfds"]:
            match = "any" if e["datamatch"] is None else e["datamatch"]
            end = e["addr"] + max(e["size"], 1) - 1
            width = "" if e["size"] else ", any length"
            lines.append(f"{pad}{MTREE_INDENT}{e['addr']:016x}-{end:016x}"
                         f" (ioeventfd{width}): datamatch={match} -> {e['eventfd']}")
        for s in r["subregions"]:
            mr(s, level + 1)

    for space in spaces:
        lines.append(f"address-space: {space['address-space']}")
        mr(space["root"], 1)
        lines.append("")
    return "\n".join(lines).rstrip("\n")


# -- info network, bh, iohandlers ---------------------------------------------------------------


def hmp_info_network(d: dict[str, Any]) -> str:
    lines = []
    for r in d["clients"]:
        peer = r["type"] != "nic"  # a backend, printed under the NIC queue it serves
        lead = " \\ " if peer else ""
        lines.append(f"{lead}{r['name']}: index={r.get('index', 0)},type={r['type']},"
                     f"{r['info']}")
        q = r["incoming_queue"]
        off = ", receive disabled" if r["receive_disabled"] else ""
        lines.append(f"{'   ' if peer else ''}  sent {r['sent']}, received {r['received']},"
                     f" queue {q['len']}/{q['maxlen']} (queued {q['queued']}, dropped "
                     f"{q['dropped']}){off}")
    if d.get("slirp") is not None:
        s = d["slirp"]["stats"]
        lines.append(f"   slirp: udp sent {s.get('udp_sent', 0)}, received "
                     f"{s.get('udp_received', 0)}, {len(d['slirp']['flows'])} flow(s)")
    tap = d.get("tap")
    if tap is not None:
        for i, tq in enumerate(tap.get("queues", [tap])):
            t = tq["stats"]
            lines.append(f"   tap queue {i}: fd {tq['fd']}, vnet header {tq['vnet_hdr_len']} B,"
                         f" written {t['written']} (would block {t['write_eagain']}), read "
                         f"{t['read']}{'' if tq.get('enabled', True) else ', detached'}")
        if "vhost" in tap:
            v = tap["vhost"]
            who = ("the kernel's vhost workers serve the data queues, QEMU the control queue"
                   if v["started"] else "QEMU serves the queues")
            lines.append(f"   vhost-net: {'started' if v['started'] else 'stopped'} "
                         f"(starts {v['starts']}, stops {v['stops']}): {who}")
            for p in v.get("pairs", []):
                lines.append(f"     queue pair {p['vq_index'] // 2}: vqs {p['vq_index']}-"
                             f"{p['vq_index'] + 1}, {'started' if p['started'] else 'stopped'}"
                             f", {p['ioctls']} ioctls")
    return "\n".join(lines)


def hmp_info_bh(d: dict[str, Any]) -> str:
    lines = [f"{r['name']} ({r['callback']}): {'|'.join(r['flags']) or '-'} runs={r['runs']}"
             for r in d["bhs"]]
    lines.append(f"bh_list: {', '.join(d['bh_list']) or 'empty'}")
    lines.append(f"notify_me={d['notify_me']} notified={int(d['notified'])} "
                 f"aio_notify calls={d['aio_notifies']} (notifier written {d['notifier_sets']})")
    return "\n".join(lines)


def hmp_info_iohandlers(d: dict[str, Any]) -> str:
    lines = [f"aio notifier: fd {d['aio_notifier']}"]
    lines += [f"fd {r['fd']}: {r['name']} read={r['fd_read']} write={r['fd_write']}"
              f"{' (deleted)' if r['deleted'] else ''}" for r in d["handlers"]]
    lines.append(f"slirp pollfds: {d['pollfds']}")
    lines += [f"timer {t['name']}: expires at {t['expire_ns']} ns" for t in d["timers"]]
    lines.append(f"main_loop_wait iterations: {d['iterations']}")
    return "\n".join(lines)


def register_info(mon: Monitor, m: Machine, locked: Locked) -> None:
    cmd = mon.command

    @cmd("query-pci", hmp="info pci", human=hmp_info_pci, help="show PCI info")
    def query_pci() -> list[dict[str, Any]]:
        with locked():
            return qmp_query_pci(m)

    @cmd(hmp="info qtree", qmp=False, human=hmp_info_qtree, help="show device tree")
    def info_qtree() -> dict[str, Any]:
        with locked():
            return qtree(m)

    @cmd(hmp="info mtree", qmp=False, human=hmp_info_mtree,
         help="show memory tree: guest RAM, the virtio-pci BARs, the MSI-X table, and the "
              "ioeventfds on each region")
    def info_mtree() -> list[dict[str, Any]]:
        with locked():
            return mtree(m)

    @cmd(hmp="info network", qmp=False, human=hmp_info_network, help="show the network state")
    def info_network() -> dict[str, Any]:
        nic, netdev = m.n.nic, m.netdev
        with locked():
            rows = []
            backend = ("net=10.0.2.0,restrict=off" if m.slirp is not None else
                       f"ifname=tap0,script=no,downscript=no,vhost="
                       f"{'on' if m.tap.vhost_net else 'off'}")
            nic_info = f"model={nic.model},macaddr={m.n.mac.hex(':')}"
            if m.tap_ncs:  # a multiqueue tap: each NIC queue with its own tap queue
                clients = [c for nc in m.tap_ncs for c in ((nc.peer, nic_info), (nc, backend))]
            else:
                clients = [(nic, nic_info), (netdev, backend)]
            for nc, info in clients:
                q = nc.incoming_queue
                rows.append({"name": nc.name, "index": nc.queue_index, "type": nc.info.type,
                             "info": info,
                             "peer": nc.peer.name if nc.peer else None,
                             "link_down": nc.link_down,
                             "receive_disabled": nc.receive_disabled, "sent": nc.sent,
                             "received": nc.received,
                             "incoming_queue": {"len": len(q.packets), "queued": q.queued,
                                                "dropped": q.dropped, "maxlen": q.nq_maxlen}})
            tap = m.tap.describe() if m.tap is not None else None
            if tap is not None and len(m.tap_ncs) > 1:
                tap["queues"] = [nc.opaque.describe() for nc in m.tap_ncs]
            if tap is not None and m.tap.vhost_net:
                tap["vhost"] = m.vhost_describe()
            return {"clients": rows, "slirp": m.slirp.describe() if m.slirp else None,
                    "tap": tap}

    @cmd(hmp="info bh", qmp=False, human=hmp_info_bh,
         help="show the machine's bottom halves and the main AioContext's bh_list")
    def info_bh() -> dict[str, Any]:
        ctx = m.main_loop.ctx
        with locked():
            listed = [bh for head in (ctx.bh_list, *(s.bh_list for s in ctx.bh_slice_list))
                      for bh in reversed(head)]
            rows = [{"name": bh.name, "callback": getattr(bh.cb, "__name__", str(bh.cb)),
                     "flags": bh_flag_names(bh.flags), "on_bh_list": bh in listed,
                     "runs": bh.runs} for bh in m.bottom_halves()]
            return {"bhs": rows, "bh_list": [bh.name for bh in listed],
                    "notify_me": ctx.notify_me, "notified": ctx.notified,
                    "aio_notifies": ctx.notifies, "notifier_sets": ctx.notifier_sets}

    @cmd(hmp="info iohandlers", qmp=False, human=hmp_info_iohandlers,
         help="show the main loop's fd handlers, pollfds and timers")
    def info_iohandlers() -> dict[str, Any]:
        ml = m.main_loop
        with locked():
            rows = [{"fd": r.fd, "name": r.name,
                     "fd_read": getattr(r.io_read, "__name__", None),
                     "fd_write": getattr(r.io_write, "__name__", None),
                     "deleted": r.deleted} for r in ml.io_handlers]
            slirp_fds: list[tuple[int, int]] = []
            for fill in ml.pollfds_fill:  # as the next iteration will (a due flow expires)
                fill(slirp_fds, -1)
            timers = [{"name": t.name, "expire_ns": t.expire_time}
                      for tl in ml.main_loop_tlg.tl for t in tl.active_timers]
            return {"aio_notifier": ml.ctx.notifier, "handlers": rows,
                    "pollfds": [fd for fd, _ in slirp_fds], "timers": timers,
                    "iterations": ml.iterations}
