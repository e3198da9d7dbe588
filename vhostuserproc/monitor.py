"""The backend process's monitor (``vreplica attach vhost-user``): ``info vhost-user`` shows
the regions of guest RAM it mapped, each queue's indices and state, the negotiated virtio
and protocol features, and the frames it moved each way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.monitor.monitor import Monitor
from common.vhost_user_abi import VhostUserProtocolFeature
from common.virtio_abi import feature_names
from vhostuserproc.libvhost_user_packed import VuPackedRing
from vhostuserproc.vhost_user_bridge import VubrDev

ROLE = "vhost-user"


def describe(vubr: VubrDev) -> dict[str, Any]:
    dev = vubr.vudev
    out: dict[str, Any] = {"connected": dev is not None, "poll": vubr.poll,
                           "hdrlen": vubr.hdrlen, "mrg_rxbuf": vubr.mrg_rxbuf,
                           "panics": list(vubr.panics), **vubr.summary()}
    if dev is None:
        return out
    out["broken"] = dev.broken
    out["features"] = feature_names(dev.features)
    out["protocol_features"] = [p.name for p in VhostUserProtocolFeature
                                if dev.protocol_features >> p & 1]
    out["regions"] = [{"guest_phys_addr": r.gpa, "memory_size": r.size,
                       "userspace_addr": r.qva, "mmap_offset": r.mmap_offset}
                      for r in list(dev.regions)]
    queues = []
    for vq in dev.vq:
        q: dict[str, Any] = {
            "index": vq.index, "num": vq.num, "ring": "packed" if vq.packed else
            "split" if vq.vring else "unmapped", "enabled": vq.enable, "started": vq.started,
            "last_avail_idx": vq.last_avail_idx, "shadow_avail_idx": vq.shadow_avail_idx,
            "used_idx": vq.used_idx, "inuse": vq.inuse, "notification": vq.notification,
            "kick_fd": vq.kick_fd != -1, "call_fd": vq.call_fd != -1, "kicks": vq.kicks,
            "calls": vq.calls, "inflight": vq.inflight is not None}
        if isinstance(vq.packed, VuPackedRing):
            q["avail_wrap_counter"] = vq.packed.last_avail_wrap_counter
            q["used_wrap_counter"] = vq.packed.used_wrap_counter
        queues.append(q)
    out["vqs"] = queues
    return out


def info_vhost_user_text(d: dict[str, Any]) -> str:
    if not d["connected"]:
        return "vhost-user backend: no front-end connected"
    lines = [f"vhost-user backend: {'BROKEN, ' if d['broken'] else ''}header {d['hdrlen']} "
             f"bytes{', poll mode' if d['poll'] else ''}",
             f"features: {' '.join(d['features'])}",
             f"protocol features: {' '.join(d['protocol_features'])}"]
    for r in d["regions"]:
        lines.append(f"region gpa {r['guest_phys_addr']:#x} size {r['memory_size']:#x} "
                     f"qva {r['userspace_addr']:#x} offset {r['mmap_offset']:#x}")
    for q in d["vqs"]:
        if q["ring"] == "unmapped" and not q["started"]:
            continue
        wrap = (f" wrap avail {int(q['avail_wrap_counter'])} used "
                f"{int(q['used_wrap_counter'])}" if "avail_wrap_counter" in q else "")
        lines.append(f"vq {q['index']}: {q['ring']} num {q['num']}, "
                     f"{'enabled' if q['enabled'] else 'disabled'}, "
                     f"{'started' if q['started'] else 'stopped'}, last_avail_idx "
                     f"{q['last_avail_idx']} used_idx {q['used_idx']} inuse {q['inuse']}{wrap}, "
                     f"kicks {q['kicks']} calls {q['calls']}")
    for q in d["queues"]:
        lines.append(f"pair {q['pair']}: guest->host {q['tx_frames']} frames, host->guest "
                     f"{q['rx_frames']} frames")
    return "\n".join(lines)


def vu_monitor(vubr: VubrDev, rundir: str | Path) -> Monitor:
    """Build and start the backend's monitor in the run directory."""
    mon = Monitor(ROLE, rundir)
    mon.stats = lambda: describe(vubr)

    @mon.command("query-vhost-user", hmp="info vhost-user", human=info_vhost_user_text,
                 help="show the backend's memory regions, queues, features and frames")
    def info_vhost_user() -> dict[str, Any]:
        return describe(vubr)

    mon.start()
    return mon
