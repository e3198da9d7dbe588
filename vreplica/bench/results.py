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
    """Each of the project's goals with the measured figure and PASS/FAIL (n/a: a path
    that was not measured, such as a backend this tree does not have)."""
    out = []
    sizes = [str(s) for s in plan.sizes]

    def add(key: str, measured: str, values: list[Any], ok: Callable[[Any], bool]) -> None:
        """PASS if ``ok`` holds for every value, n/a if one is missing."""
        passed = None if not values or None in values else all(ok(x) for x in values)
        out.append({"key": key, "target": TARGETS[key], "measured": measured,
                    "result": "n/a" if passed is None else ("PASS" if passed else "FAIL")})

    def per_size(values: list[Any], fmt: Callable[[Any], str]) -> str:
        return ", ".join(f"{SIZE_LABEL[int(s)]}: {fmt(x)}"
                         for s, x in zip(sizes, values, strict=True))

    modes = res["modes"]
    e64 = res["end_to_end"].get("64", {})
    add("e2e", f"64: {fmt_x(e64.get('ratio'))} ({fmt_f(e64.get('replica_pps'))} vs "
               f"{fmt_f(e64.get('baseline_pps'))} pkt/s)", [e64.get("ratio")],
        lambda x: x >= 1.0)
    lat = res["kick_latency"]
    r = lat.get("on_over_pingpong_pinned")
    add("latency", f"p50 {fmt_f(lat['ioeventfd_on']['p50_us'], 1)} us vs "
                   f"{fmt_f(lat.get('pingpong_paced_cross_cpu_rtt_us_p50'), 1)} us: {fmt_x(r)}",
        [r], lambda x: x <= 1.5)
    costs = [res["tracing"]["off"]["per_size"][s]["cost"] for s in sizes]
    add("trace_off", per_size(costs, fmt_pct), costs, lambda c: c <= 0.03)

    def at64(mode: str, key: str = "pps") -> Any:
        return modes.get(mode, {}).get("64", {}).get(key)

    def over_default(mode: str) -> float | None:
        return ratio(at64(mode), at64("default"))

    ev = over_default("event-idx=off")
    add("event_idx", f"64: {fmt_x(ev)} ({fmt_f(at64('event-idx=off'))} pkt/s, "
                     f"{fmt_f(at64('event-idx=off', 'interrupts_per_packet'), 2)} "
                     "interrupts/packet)", [ev], lambda x: x >= 0.48)
    tb = [over_default("tx-burst=16"), over_default("tx-burst=64")]
    add("tx_burst", f"64: {fmt_x(tb[0])}, {fmt_x(tb[1])}", tb, lambda x: x >= 0.95)
    io = over_default("ioeventfd=off")
    add("ioeventfd", f"64: off at {fmt_x(io)} the speed of on", [io], lambda x: x <= 1.0)
    t = lat.get("tx_timer", {})
    add("tx_timer", f"p50 {fmt_f(t.get('p50_us'), 1)} us: {fmt_x(t.get('over_timeout'))} of "
                    f"{fmt_f(lat.get('tx_timeout_us'))} us (virtio_queue_notify -> pop "
                    f"{fmt_f(t.get('notify_to_pop_p50_us'), 1)} us)",
        [t.get("over_timeout")], lambda x: x <= 2)
    sides = res["vring_only"]["side_costs"]
    vr = [sides.get(s, {}).get("bound_ratio") for s in sizes]
    add("vring", per_size(vr, fmt_x), vr, lambda x: x >= 0.3)
    m = modes["default"]
    for key, k in (("kicks", "kicks_per_packet"), ("irqs", "interrupts_per_packet")):
        per_packet = [m[s][k] for s in sizes]
        add(key, per_size(per_packet, lambda x: fmt_f(x, 4)), per_packet, lambda x: x <= 0.01)
    rss = res["rss"]
    peaks = [rss[role]["rss_mb_max"] for role in ROLES]
    add("rss", ", ".join(f"{role} {fmt_f(rss[role]['rss_mb_max'], 1)} MB" for role in ROLES),
        peaks, lambda p: p <= 50)
    tap = modes.get("tap", {})
    for mode, speed, burst in (("tap+vhost", "vhost", "vhost_burst"),
                               ("vhost-user", "vhost_user", "vhost_user_burst")):
        mm = modes.get(mode, {})
        if not mm:
            add(speed, f"no {mode} path measured", [], bool)
            add(burst, f"no {mode} path measured", [], bool)
            continue
        rs = [ratio(mm[s]["pps"], tap.get(s, {}).get("pps")) for s in sizes]
        add(speed, per_size(rs, fmt_x), rs, lambda x: x >= 1.0)
        pairs = [(mm[s][k], tap.get(s, {}).get(k)) for s in sizes
                 for k in ("kicks_per_packet", "interrupts_per_packet")]
        add(burst, ", ".join(
            f"{SIZE_LABEL[int(s)]}: kicks {fmt_f(mm[s]['kicks_per_packet'], 4)} vs "
            f"{fmt_f(tap.get(s, {}).get('kicks_per_packet'), 4)}, interrupts "
            f"{fmt_f(mm[s]['interrupts_per_packet'], 4)} vs "
            f"{fmt_f(tap.get(s, {}).get('interrupts_per_packet'), 4)}" for s in sizes),
            [None if None in p else p for p in pairs], lambda p: p[0] <= p[1])
    cpu = res.get("cpu_stages") or {}
    vh, tp = cpu.get("tap+vhost", {}), cpu.get("tap", {})
    dev = [(vh.get(s, {}).get("device_us_per_packet"), tp.get(s, {}).get("device_us_per_packet"))
           for s in sizes]
    add("vhost_device", ", ".join(f"{SIZE_LABEL[int(s)]}: {fmt_f(a, 2)} vs {fmt_f(b, 2)} us"
                                  for s, (a, b) in zip(sizes, dev, strict=True)),
        [None if None in p else p for p in dev], lambda p: p[0] < p[1])
    wk = [(vh.get(s, {}).get("us_per_packet", {}).get("vhost worker"),
           tp.get(s, {}).get("us_per_packet", {}).get("QEMU main loop")) for s in sizes]
    add("vhost_worker", ", ".join(
        f"{SIZE_LABEL[int(s)]}: {fmt_f(a, 2)} vs {fmt_f(b, 2)} us ({fmt_x(ratio(a, b))})"
        for s, (a, b) in zip(sizes, wk, strict=True)),
        [None if None in p else p for p in wk], lambda p: p[0] <= 0.6 * p[1])
    order = list(TARGETS)
    return sorted(out, key=lambda t: order.index(t["key"]))
