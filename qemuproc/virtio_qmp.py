"""Stands for hw/virtio/virtio.c's QMP introspection in QEMU 7.2 (qmp_x_query_virtio,
qmp_x_query_virtio_status, qmp_x_query_virtio_queue_status,
qmp_x_query_virtio_queue_element; virtio-qmp.c from 8.0) and monitor/hmp-cmds.c's
hmp_virtio_* that print them as ``info virtio...``.

Field names are qapi/virtio.json's. As 7.2's CONVERT_FEATURES and the descriptor walk
prepend to their lists, features, statuses, descriptor flags and a chain's descriptors come
out in reverse order, last first: 7.2 shows them so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.guest_memory import GuestMemoryError
from common.monitor.commands import Arg, MonitorError
from common.virtio_abi import VIRTIO_F_RING_PACKED
from common.vring import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from common.vring_packed import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED

if TYPE_CHECKING:
    from common.monitor.monitor import Monitor
    from qemuproc.virtio import VirtIODevice, VirtQueue

VIRTIO_PATH = "/machine/peripheral-anon/device[0]/virtio-backend"

VIRTIO_TRANSPORT_MAP = [
    (24, "VIRTIO_F_NOTIFY_ON_EMPTY: Notify when device runs out of avail. descs. on VQ"),
    (27, "VIRTIO_F_ANY_LAYOUT: Device accepts arbitrary desc. layouts"),
    (32, "VIRTIO_F_VERSION_1: Device compliant for v1 spec (legacy)"),
    (33, "VIRTIO_F_IOMMU_PLATFORM: Device can be used on IOMMU platform"),
    (34, "VIRTIO_F_RING_PACKED: Device supports packed VQ layout"),
    (35, "VIRTIO_F_IN_ORDER: Device uses buffers in same order as made available by driver"),
    (36, "VIRTIO_F_ORDER_PLATFORM: Memory accesses ordered by platform"),
    (37, "VIRTIO_F_SR_IOV: Device supports single root I/O virtualization"),
    (28, "VIRTIO_RING_F_INDIRECT_DESC: Indirect descriptors supported"),
    (29, "VIRTIO_RING_F_EVENT_IDX: Used & avail. event fields enabled"),
]
VIRTIO_CONFIG_STATUS_MAP = [
    (4, "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"),
    (8, "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete"),
    (2, "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"),
    (64, "VIRTIO_CONFIG_S_NEEDS_RESET: Irrecoverable error, device needs reset"),
    (128, "VIRTIO_CONFIG_S_FAILED: Error in guest, device failed"),
    (1, "VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found"),
]
VIRTIO_NET_FEATURE_MAP = [
    (0, "VIRTIO_NET_F_CSUM: Device handling packets with partial checksum supported"),
    (1, "VIRTIO_NET_F_GUEST_CSUM: Driver handling packets with partial checksum supported"),
    (2, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: Control channel offloading reconfig. supported"),
    (3, "VIRTIO_NET_F_MTU: Device max MTU reporting supported"),
    (5, "VIRTIO_NET_F_MAC: Device has given MAC address"),
    (7, "VIRTIO_NET_F_GUEST_TSO4: Driver can receive TSOv4"),
    (8, "VIRTIO_NET_F_GUEST_TSO6: Driver can receive TSOv6"),
    (9, "VIRTIO_NET_F_GUEST_ECN: Driver can receive TSO with ECN"),
    (10, "VIRTIO_NET_F_GUEST_UFO: Driver can receive UFO"),
    (11, "VIRTIO_NET_F_HOST_TSO4: Device can receive TSOv4"),
    (12, "VIRTIO_NET_F_HOST_TSO6: Device can receive TSOv6"),
    (13, "VIRTIO_NET_F_HOST_ECN: Device can receive TSO with ECN"),
    (14, "VIRTIO_NET_F_HOST_UFO: Device can receive UFO"),
    (15, "VIRTIO_NET_F_MRG_RXBUF: Driver can merge receive buffers"),
    (16, "VIRTIO_NET_F_STATUS: Configuration status field available"),
    (17, "VIRTIO_NET_F_CTRL_VQ: Control channel available"),
    (18, "VIRTIO_NET_F_CTRL_RX: Control channel RX mode supported"),
    (19, "VIRTIO_NET_F_CTRL_VLAN: Control channel VLAN filtering supported"),
    (20, "VIRTIO_NET_F_CTRL_RX_EXTRA: Extra RX mode control supported"),
    (21, "VIRTIO_NET_F_GUEST_ANNOUNCE: Driver sending gratuitous packets supported"),
    (22, "VIRTIO_NET_F_MQ: Multiqueue with automatic receive steering supported"),
    (23, "VIRTIO_NET_F_CTRL_MAC_ADDR: MAC address set through control channel"),
    (57, "VIRTIO_NET_F_HASH_REPORT: Hash reporting supported"),
    (60, "VIRTIO_NET_F_RSS: RSS RX steering supported"),
    (61, "VIRTIO_NET_F_RSC_EXT: Extended coalescing info supported"),
    (62, "VIRTIO_NET_F_STANDBY: Device acting as standby for primary device with same MAC "
         "addr. supported"),
    (63, "VIRTIO_NET_F_SPEED_DUPLEX: Device set linkspeed and duplex"),
    (6, "VIRTIO_NET_F_GSO: Handling GSO-type packets supported"),
    (27, "VHOST_NET_F_VIRTIO_NET_HDR: Virtio-net headers for RX and TX packets supported"),
    (26, "VHOST_F_LOG_ALL: Logging write descriptors supported"),
    (30, "VHOST_USER_F_PROTOCOL_FEATURES: Vhost-user protocol features negotiation supported"),
]
PACKED_WRAP_COUNTERS = ("last-avail-wrap-counter", "shadow-avail-wrap-counter",
                        "used-wrap-counter")
"""The packed ring's wrap counters: the replica adds them to the queue status (7.2's
VirtQueueStatus has no field for them)."""
DESC_FLAGS_MAP = [(VRING_DESC_F_NEXT, "next"), (VRING_DESC_F_WRITE, "write"),
                  (VRING_DESC_F_INDIRECT, "indirect"), (1 << VRING_PACKED_DESC_F_AVAIL, "avail"),
                  (1 << VRING_PACKED_DESC_F_USED, "used")]


def convert_features(fmap: list[tuple[int, str]], bitmap: int, is_status: bool
                     ) -> tuple[list[str], int]:
    """CONVERT_FEATURES: the names of the bits set (prepended, so last first) and the bits
    left over."""
    out: list[str] = []
    for bit, desc in fmap:
        mask = bit if is_status else 1 << bit
        if bitmap & mask:
            out.insert(0, desc)
            bitmap ^= mask
    return out, bitmap


def qmp_decode_status(bitmap: int) -> dict[str, Any]:
    statuses, left = convert_features(VIRTIO_CONFIG_STATUS_MAP, bitmap, True)
    out: dict[str, Any] = {"statuses": statuses}
    if left:
        out["unknown-statuses"] = left
    return out


def qmp_decode_features(bitmap: int) -> dict[str, Any]:
    transports, bitmap = convert_features(VIRTIO_TRANSPORT_MAP, bitmap, False)
    dev, bitmap = convert_features(VIRTIO_NET_FEATURE_MAP, bitmap, False)
    out: dict[str, Any] = {"transports": transports, "dev-features": dev}
    if bitmap:
        out["unknown-dev-features"] = bitmap
    return out


def qmp_decode_vring_desc_flags(flags: int) -> list[str]:
    out: list[str] = []
    for flag, name in DESC_FLAGS_MAP:
        if flags & flag:
            out.insert(0, name)
    return out


# -- HMP --------------------------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    return ",\n".join(f"\t{s}" for s in items)


def hmp_virtio_dump_features(f: dict[str, Any]) -> list[str]:
    lines = [_listing(f["transports"])]
    if f.get("dev-features"):
        lines.append(_listing(f["dev-features"]))
    if "unknown-dev-features" in f:
        lines.append(f"  unknown-features(0x{f['unknown-dev-features']:016x})")
    return lines


def hmp_virtio_status(d: dict[str, Any]) -> str:
    yes = {True: "true", False: "false"}
    rows = [("device_name", d["name"]), ("device_id", d["device-id"]),
            ("vhost_started", d["vhost-started"]), ("bus_name", d["bus-name"]),
            ("broken", d["broken"]), ("disabled", d["disabled"]),
            ("disable_legacy_check", d["disable-legacy-check"]),
            ("started", d["started"]), ("use_started", d["use-started"]),
            ("start_on_kick", d["start-on-kick"]),
            ("use_guest_notifier_mask", d["use-guest-notifier-mask"]),
            ("vm_running", d["vm-running"]), ("num_vqs", d["num-vqs"]),
            ("queue_sel", d["queue-sel"]), ("isr", d["isr"]),
            ("endianness", d["device-endian"])]
    lines = [f"{VIRTIO_PATH}:"]
    lines += [f"  {k + ':':<25}{yes.get(v, v) if isinstance(v, bool) else v}" for k, v in rows]
    lines.append("  status:")
    lines.append(_listing(d["status"]["statuses"]))
    for title, key in (("Guest features", "guest-features"), ("Host features", "host-features"),
                       ("Backend features", "backend-features")):
        lines.append(f"  {title}:")
        lines += hmp_virtio_dump_features(d[key])
    return "\n".join(lines)


def hmp_virtio_queue_status(d: dict[str, Any]) -> str:
    wraps = [f"  {k.replace('-', '_') + ':':<22}{str(d[k]).lower()}"
             for k in PACKED_WRAP_COUNTERS if k in d]
    return "\n".join([
        f"{VIRTIO_PATH}:",
        f"  device_name:          {d['name']}",
        f"  queue_index:          {d['queue-index']}",
        f"  inuse:                {d['inuse']}",
        f"  used_idx:             {d['used-idx']}",
        f"  signalled_used:       {d['signalled-used']}",
        f"  signalled_used_valid: {str(d['signalled-used-valid']).lower()}",
        f"  last_avail_idx:       {d['last-avail-idx']}",
        f"  shadow_avail_idx:     {d['shadow-avail-idx']}",
        *wraps,
        "  VRing:",
        f"    num:          {d['vring-num']}",
        f"    num_default:  {d['vring-num-default']}",
        f"    align:        {d['vring-align']}",
        f"    desc:         0x{d['vring-desc']:016x}",
        f"    avail:        0x{d['vring-avail']:016x}",
        f"    used:         0x{d['vring-used']:016x}",
    ])


def hmp_virtio_queue_element(d: dict[str, Any]) -> str:
    descs = ",\n".join(
        f"        addr 0x{x['addr']:x} len {x['len']}"
        + (f" ({', '.join(x['flags'])})" if x["flags"] else "") for x in d["descs"])
    return "\n".join([
        f"{VIRTIO_PATH}:", f"  device_name: {d['name']}", f"  index:   {d['index']}",
        "  desc:", "    descs:", descs, "  avail:", f"    flags: {d['avail']['flags']}",
        f"    idx:   {d['avail']['idx']}", f"    ring:  {d['avail']['ring']}", "  used:",
        f"    flags: {d['used']['flags']}", f"    idx:   {d['used']['idx']}",
    ])


# -- the commands -------------------------------------------------------------------------------


def register_virtio_qmp(mon: Monitor, vdev: VirtIODevice, locked: Any) -> None:
    """The x-query-virtio* commands of ``vdev``; ``locked()`` holds the BQL around a read."""
    path_arg = Arg("path", hmp_prefix="/", hmp_default=VIRTIO_PATH)

    def virtio_device_find(path: str, what: str = "VirtIODevice") -> VirtIODevice:
        if path != VIRTIO_PATH:
            raise MonitorError(f"Path {path} is not a {what}")
        return vdev

    def virtqueue(queue: int) -> VirtQueue:
        if not 0 <= queue < len(vdev.vq) or not vdev.vq[queue].num:
            raise MonitorError(f"Invalid virtqueue number {queue}")
        return vdev.vq[queue]

    @mon.command("x-query-virtio", hmp="info virtio",
                 human=lambda rows: "\n".join(f"{r['path']} [{r['name']}]" for r in rows),
                 help="list all available virtio devices")
    def x_query_virtio() -> list[dict[str, str]]:
        return [{"path": VIRTIO_PATH, "name": vdev.name}]

    @mon.command("x-query-virtio-status", hmp="info virtio-status", args=(path_arg,),
                 params="[path]", human=hmp_virtio_status,
                 help="show a virtio device's status")
    def x_query_virtio_status(path: str) -> dict[str, Any]:
        virtio_device_find(path)
        with locked():
            return {
                "name": vdev.name, "device-id": vdev.device_id,
                "vhost-started": getattr(vdev, "vhost_started", False),
                "device-endian": "little",
                "guest-features": qmp_decode_features(vdev.guest_features),
                "host-features": qmp_decode_features(vdev.host_features),
                "backend-features": qmp_decode_features(0),
                "num-vqs": sum(1 for vq in vdev.vq if vq.num), "status":
                qmp_decode_status(vdev.status), "isr": vdev.isr, "queue-sel": vdev.queue_sel,
                "vm-running": vdev.vm_running, "broken": vdev.broken, "disabled": False,
                "use-started": True, "started": vdev.started, "start-on-kick": False,
                "disable-legacy-check": False, "bus-name": "virtio-pci-bus",
                "use-guest-notifier-mask": True,
            }

    @mon.command("x-query-virtio-queue-status", hmp="info virtio-queue-status",
                 args=(path_arg, Arg("queue", "int")), params="[path] queue",
                 human=hmp_virtio_queue_status, help="show a virtio queue's status")
    def x_query_virtio_queue_status(path: str, queue: int) -> dict[str, Any]:
        virtio_device_find(path)
        vq = virtqueue(queue)
        with locked():
            return {
                "name": vdev.name, "queue-index": vq.queue_index, "inuse": vq.inuse,
                "vring-num": vq.num, "vring-num-default": vq.num_default,
                "vring-align": vq.align, "vring-desc": vq.desc, "vring-avail": vq.avail,
                "vring-used": vq.used, "last-avail-idx": vq.last_avail_idx,
                "shadow-avail-idx": vq.shadow_avail_idx, "used-idx": vq.used_idx,
                "signalled-used": vq.signalled_used,
                "signalled-used-valid": vq.signalled_used_valid,
                **({"last-avail-wrap-counter": vq.last_avail_wrap_counter,
                    "shadow-avail-wrap-counter": vq.shadow_avail_wrap_counter,
                    "used-wrap-counter": vq.used_wrap_counter}
                   if vdev.guest_features >> VIRTIO_F_RING_PACKED & 1 else {}),
            }

    @mon.command("x-query-virtio-queue-element", hmp="info virtio-queue-element",
                 args=(path_arg, Arg("queue", "int"), Arg("index", "int", True)),
                 params="[path] queue [index]", human=hmp_virtio_queue_element,
                 help="show the descriptor chain at an avail ring index "
                      "(default: last_avail_idx)")
    def x_query_virtio_queue_element(path: str, queue: int,
                                     index: int | None = None) -> dict[str, Any]:
        virtio_device_find(path, "VirtIO device")
        vq = virtqueue(queue)
        if vdev.guest_features >> VIRTIO_F_RING_PACKED & 1:
            raise MonitorError("Packed ring not supported")
        if not vq.desc:
            raise MonitorError("Region caches not initialized")
        dma = vdev.dma
        try:
            with locked():
                slot = (vq.last_avail_idx if index is None else index) % vq.num
                avail_flags, avail_idx = _u16s(dma.dma_memory_read(vq.avail, 4))
                head = _u16s(dma.dma_memory_read(vq.avail + 4 + 2 * slot, 2))[0]
                used_flags, used_idx = _u16s(dma.dma_memory_read(vq.used, 4))
                descs = vring_split_chain(dma, vq.desc, vq.num, head)
        except GuestMemoryError as e:
            raise MonitorError(f"Cannot map descriptor ring: {e}") from None
        return {"name": vdev.name, "index": head, "descs": descs,
                "avail": {"flags": avail_flags, "idx": avail_idx, "ring": head},
                "used": {"flags": used_flags, "idx": used_idx}}


def vring_split_chain(dma: Any, desc_table: int, num: int, head: int) -> list[dict[str, Any]]:
    """The chain from ``head`` as 7.2 lists it (an indirect head: its table's chain), at most
    as many descriptors as the table holds, last first. A link out of the table ends it (QEMU
    also calls virtio_error there; a query here leaves the device alone)."""
    table, limit, i = desc_table, num, head
    if i >= limit:
        return []
    addr, length, flags, nxt = DESC.unpack(dma.dma_memory_read(table + 16 * i, 16))
    if flags & VRING_DESC_F_INDIRECT:
        table, limit, i = addr, length // 16, 0
        addr, length, flags, nxt = DESC.unpack(dma.dma_memory_read(table, 16))
    out: list[dict[str, Any]] = []
    while len(out) < limit:
        out.insert(0, {"addr": addr, "len": length, "flags": qmp_decode_vring_desc_flags(flags)})
        if not flags & VRING_DESC_F_NEXT or nxt >= limit:
            break
        addr, length, flags, nxt = DESC.unpack(dma.dma_memory_read(table + 16 * nxt, 16))
    return out


def _u16s(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]
