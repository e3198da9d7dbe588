"""vreplica bench, section 10: the split ring against the packed ring, in the same run.

Both on the modern transport (VIRTIO_F_RING_PACKED needs VERSION_1), otherwise the default
configuration, toward the bench's own sink: packets/s, kicks and TX interrupts per packet,
and whether every datagram arrived in order. ``vreplica bench --only rings`` runs just this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vreplica.bench.core import (
    SIZE_LABEL,
    Plan,
    all_delivered,
    checked,
    median,
    pps_basis,
    ratio,
    replica_options,
    run_replica,
)
from vreplica.bench.fmt import fmt_f, fmt_spread, table

RINGS = ("split", "packed")


def section_rings(plan: Plan, log: Callable[[str], None], failures: list[dict],
                  trials: int | None = None) -> dict:
    """``trials`` (default: the plan's, as ``--trials`` sets it) rounds of both rings at
    each size."""

    runs: list[dict] = []
    trials = plan.trials if trials is None else trials
    for t in range(trials):
        for size in plan.sizes:
            for ring in RINGS:  # interleaved: both kinds see the same machine load
                opts = replica_options(plan, size,
                                       extra={"transport": "modern", "ring": ring})
                r = checked(f"rings trial {t + 1} {ring} {size} B",
                            lambda o=opts: run_replica(o, sample_rss=False), log, failures)
                if r is not None:
                    runs.append({"trial": t, "ring": ring, **r})
    return {"packets": plan.e2e_packets, "trials": trials, "runs": runs,
            "per_ring": fold_rings(runs, plan)}


def fold_rings(runs: list[dict], plan: Plan) -> dict[str, dict[str, Any]]:

    basis = pps_basis(runs)
    out: dict[str, dict[str, Any]] = {}
    for ring in RINGS:
        for size in plan.sizes:
            rs = [r for r in runs if r["ring"] == ring and r["size"] == size]
            out.setdefault(ring, {})[str(size)] = {
                "pps": median([r[basis] for r in rs]),
                "pps_min": min((r[basis] for r in rs if r[basis]), default=None),
                "pps_max": max((r[basis] for r in rs if r[basis]), default=None),
                "kicks_per_packet": median([r["kicks_per_packet"] for r in rs]),
                "interrupts_per_packet": median([r["interrupts_per_packet"] for r in rs]),
                "trials": len(rs),
                "all_delivered_in_order": all_delivered(rs),
            }
    return out


def render_rings(sec: dict, plan: Plan) -> list[str]:

    if not sec:
        return []
    per = sec["per_ring"]
    rows = []
    for size in plan.sizes:
        for ring in RINGS:
            r = per[ring][str(size)]
            rows.append([ring, SIZE_LABEL[int(size)], fmt_spread(r, "pps"),
                         fmt_f(r["kicks_per_packet"], 4), fmt_f(r["interrupts_per_packet"], 4),
                         "yes" if r["all_delivered_in_order"] else "**no**"])
    L = ["## 10. Split ring against packed ring", "",
         f"`--transport modern`, `--ring split` and `--ring packed` interleaved in each of "
         f"{sec['trials']} trial(s), {sec['packets']:,} datagrams a run, the default device "
         "otherwise; same sink and basis as section 2. Interrupts = TX-queue interrupts.", ""]
    L += table(["ring", "payload", "packets/s (range)", "kicks/packet", "interrupts/packet",
                "all delivered, in order"], rows)
    for size in plan.sizes:
        q = ratio(per["packed"][str(size)]["pps"], per["split"][str(size)]["pps"])
        L.append(f"- {SIZE_LABEL[int(size)]}: packed/split packets/s = "
                 f"{fmt_f(q, 2) if q is not None else 'n/a'}")
    L.append("")
    return L
