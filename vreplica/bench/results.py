"""The end-to-end runs folded into the report's figures, and each goal of docs/speed.md with
the measured figure and whether it is met."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vreplica.bench.core import (
    ROLES,
    SIZE_LABEL,
    TARGETS,
    Plan,
    all_delivered,
    median,
    pps_basis,
    ratio,
    sink_check,
)
from vreplica.bench.fmt import fmt_f, fmt_pct, fmt_x


def fold(e2e: dict, plan: Plan) -> dict[str, Any]:
    runs, base = e2e["runs"], e2e["baseline_runs"]
    basis = pps_basis(runs)
    modes: dict[str, dict[str, Any]] = {}
    for mode in plan.modes + ("trace=on",):
        for size in plan.sizes:
            rs = [r for r in runs if r["mode"] == mode and r["size"] == size]
            modes.setdefault(mode, {})[str(size)] = {
                "pps": median([r[basis] for r in rs]),
                "pps_min": min((r[basis] for r in rs if r[basis]), default=None),
                "pps_max": max((r[basis] for r in rs if r[basis]), default=None),
                "pps_arrival_window": median([r["pps_arrival_window"] for r in rs]),
                "guest_send_pps": median([r["guest_send_pps"] for r in rs]),
                "kicks_per_packet": median([r["kicks_per_packet"] for r in rs]),
                "interrupts_per_packet": median([r["interrupts_per_packet"] for r in rs]),
                **{f"{k}_{f.__name__}": f((r[k] for r in rs if r[k] is not None),
                                          default=None)
                   for k in ("kicks_per_packet", "interrupts_per_packet") for f in (min, max)},
                "trials": len(rs),
                "all_delivered_in_order": all_delivered(rs),
            }
    e2e_tab: dict[str, dict[str, Any]] = {}
    for size in plan.sizes:
        bs = [b for b in base if b["size"] == size]
        b_pps = median([b.get(basis) for b in bs])
        r_pps = modes["default"][str(size)]["pps"]
        c_pps = median([c.get(basis) for c in e2e.get("ceiling_runs", [])
                        if c["size"] == size])
        tap_pps = modes.get("tap", {}).get(str(size), {}).get("pps")
        vhost_pps = modes.get("tap+vhost", {}).get(str(size), {}).get("pps")
        e2e_tab[str(size)] = {
            "tap_pps": tap_pps, "vhost_pps": vhost_pps,
            "vhost_over_tap": ratio(vhost_pps, tap_pps),
            "vhost_over_baseline": ratio(vhost_pps, b_pps),
            "tap_over_baseline": ratio(tap_pps, b_pps),
            "replica_pps": r_pps, "baseline_pps": b_pps, "ratio": ratio(r_pps, b_pps),
            "sendto_alone_pps": c_pps, "sendto_alone_ratio": ratio(c_pps, b_pps),
            "baseline_pps_min": min((b[basis] for b in bs if b.get(basis)), default=None),
            "baseline_pps_max": max((b[basis] for b in bs if b.get(basis)), default=None),
            "baseline_pps_send_to_last_arrival": median(
                [b.get("pps_send_to_last_arrival") for b in bs]),
            "baseline_all_delivered_in_order": all_delivered(bs)}
    rss: dict[str, dict[str, Any]] = {}
    plain = [r for r in runs if r["mode"] != "trace=on" and r.get("rss_mb")]
    for role in ROLES:
        rss[role] = {
            "rss_mb_max": max((r["rss_mb"].get(role, 0) for r in plain), default=None),
            "rss_mb_median": median([r["rss_mb"].get(role) for r in plain]),
            "uss_mb_max": max((r["uss_mb"].get(role, 0) for r in plain), default=None),
            "rss_mb_max_by_size": {str(s): max((r["rss_mb"].get(role, 0) for r in plain
                                                if r["size"] == s), default=None)
                                   for s in plan.sizes}}
    tracing_on = {str(s): {"pps_off": modes["default"][str(s)]["pps"],
                           "pps_on": modes["trace=on"][str(s)]["pps"],
                           "slowdown": ratio(modes["default"][str(s)]["pps"],
                                             modes["trace=on"][str(s)]["pps"])}
                  for s in plan.sizes}
    correctness = [sink_check(r["mode"], r) for r in runs]
    correctness += [sink_check("mp.Queue+sendto", b) for b in base]
    correctness += [sink_check("sendto alone", c) for c in e2e.get("ceiling_runs", [])]
    return {"basis": basis, "modes": modes, "end_to_end": e2e_tab, "rss": rss,
            "tracing_on": tracing_on, "correctness": correctness,
            "stalled_runs": [f"{r['mode']} {r['size']} B trial {r['trial'] + 1}"
                             for r in runs if r.get("tx_drained") is False]}


def targets(res: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Each goal (TARGETS) with the measured figure and PASS/FAIL (n/a: not measured)."""
    out = []
    sizes = [str(s) for s in plan.sizes]

    def add(key: str, measured: str, values: list[Any], ok: Callable[[Any], bool]) -> None:
        """PASS if ``ok`` holds for every value, n/a if one is missing."""
        passed = None if not values or None in values else all(ok(x) for x in values)
        out.append({"target": TARGETS[key], "measured": measured,
                    "result": "n/a" if passed is None else ("PASS" if passed else "FAIL")})

    def per_size(values: list[Any], fmt: Callable[[Any], str]) -> str:
        return ", ".join(f"{SIZE_LABEL[int(s)]}: {fmt(x)}"
                         for s, x in zip(sizes, values, strict=True))

    modes = res["modes"]

    def pps(mode: str, size: str = "64") -> float | None:
        return modes.get(mode, {}).get(size, {}).get("pps")

    e = res["end_to_end"]
    r64 = e.get("64", {}).get("ratio")
    add("e2e", f"64: {fmt_x(r64)}", [r64], lambda x: x >= 1.0)
    lat = res["kick_latency"]
    on, pinned = lat["ioeventfd_on"]["p50_us"], lat.get("pingpong_paced_cross_cpu_rtt_us_p50")
    r = ratio(on, pinned)
    add("latency", f"p50 {fmt_f(on, 1)} us vs pinned paced ping-pong {fmt_f(pinned, 1)} us: "
                   f"{fmt_x(r)}", [r], lambda x: x <= 1.5)
    costs = [res["tracing"]["off"]["per_size"][s]["cost"] for s in sizes]
    add("trace_off", per_size(costs, fmt_pct), costs, lambda c: c <= 0.03)
    vt = [e.get(s, {}).get("vhost_over_tap") for s in sizes]
    add("vhost", per_size(vt, fmt_x), vt, lambda x: x >= 1.0)
    notify = [(modes.get("tap+vhost", {}).get(s, {}).get(k),
               modes.get("tap", {}).get(s, {}).get(k))
              for s in sizes for k in ("kicks_per_packet", "interrupts_per_packet")]
    add("vhost_notify", ", ".join(
        f"{SIZE_LABEL[int(s)]}: kicks {fmt_f(notify[2 * i][0], 4)} vs "
        f"{fmt_f(notify[2 * i][1], 4)}, "
        f"interrupts {fmt_f(notify[2 * i + 1][0], 4)} vs {fmt_f(notify[2 * i + 1][1], 4)}"
        for i, s in enumerate(sizes)),
        [None if None in pair else pair for pair in notify], lambda p: p[0] <= p[1])
    add("vhost_cpu", "not measured: the benchmark records no CPU time per thread", [],
        lambda x: False)
    t = lat.get("tx_timer", {})
    add("tx_timer", f"p50 {fmt_f(t.get('p50_us'), 1)} us: {fmt_x(t.get('over_timeout'))} of "
                    f"{fmt_f(lat.get('tx_timeout_us'))} us (virtio_queue_notify -> pop "
                    f"{fmt_f(t.get('notify_to_pop_p50_us'), 1)} us)",
        [t.get("over_timeout")], lambda x: x <= 2)
    v = res["vring_only"]["median_pps"]
    vr = [v[s]["vring_over_bare"] for s in sizes]
    add("vring", per_size(vr, fmt_x), vr, lambda x: x >= 0.3)
    eo = pps("event-idx=off")
    add("event_idx_off", f"64: {fmt_f(eo)} pkt/s", [eo], lambda x: x >= 37_383)
    b16, b64 = pps("tx-burst=16"), pps("tx-burst=64")
    add("tx_burst", f"64: {fmt_f(b16)} and {fmt_f(b64)} pkt/s",
        [None if None in (b16, b64) else (b16, b64)],
        lambda p: p[0] >= 76_131 and p[1] >= 78_488)
    d, off = pps("default"), pps("ioeventfd=off")
    add("ioeventfd", f"64: on {fmt_f(d)}, off {fmt_f(off)} pkt/s",
        [None if None in (d, off) else (d, off)], lambda p: p[0] >= p[1])
    return out


