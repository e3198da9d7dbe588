"""``vreplica bench``: the replica's transmit path measured against its baselines.

Usage: vreplica bench [--quick] [--json FILE] [--out DIR]

Writes BENCHMARKS.md and bench.png at the repository root, or into DIR with --out. Every
figure is the median of several trials; every ratio compares figures from the same
invocation. "1500" in the tables is a 1472-byte UDP payload: the largest datagram the
replica carries in a 1500-byte MTU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vreplica.bench import stages
from vreplica.bench.core import FULL, LEGEND, QUICK, ROOT, Plan
from vreplica.bench.report import machine, plot, render_markdown
from vreplica.bench.results import fold, targets
from vreplica.bench.rings import render_rings, section_rings
from vreplica.bench.sections import (
    section_chaos,
    section_e2e,
    section_latency,
    section_stages,
    section_trace_cost,
    section_vring,
)
from vreplica.bench.transport import section_transport, transport_table
from vreplica.run.options import Parser
from vreplica.run.preflight import UsageError, writable_dir, writable_file


def run_bench(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    failures: list[dict] = []
    res: dict[str, Any] = {"machine": machine(), "plan": asdict(plan),
                           "e2e_packets": plan.e2e_packets}
    log("1. vring only")
    res["vring_only"] = section_vring(plan, log, failures)
    log("5. tracing off: flush loop")
    off = section_trace_cost(plan, log, failures)
    log("3. kick -> pop latency")
    res["kick_latency"] = section_latency(plan, log, failures)
    log("2/4/5/6/7. end to end")
    e2e = section_e2e(plan, log, failures)
    folded = fold(e2e, plan)
    res["end_to_end_runs"] = e2e
    res.update({k: folded[k] for k in ("basis", "end_to_end", "rss", "correctness",
                                       "stalled_runs", "modes")})
    res["kicks_interrupts"] = {s: {k: folded["modes"]["default"][s][k]
                                   for k in ("kicks_per_packet", "interrupts_per_packet")}
                               for s in folded["modes"]["default"]}
    res["tracing"] = {"off": off, "on": folded["tracing_on"]}
    res["cpu_stages"] = stages.fold_paths(e2e["runs"], plan.sizes)
    log("8. chaos: resets and restarts")
    res["chaos"] = section_chaos(plan, log, failures)
    log("9. legacy vs modern transport")
    res["transport"] = section_transport(plan, log, failures)
    log("10. split ring against packed ring")
    res["rings"] = section_rings(plan, log, failures)
    res["failures"] = failures
    res["duration_s"] = time.monotonic() - t0
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = targets(res, plan)
    return res


def only_section(plan: Plan, json_path: str | None, which: str = "transport") -> int:
    """``--only transport|rings|stages``: the legacy-vs-modern, split-vs-packed or CPU per
    stage section alone."""
    if json_path:
        try:
            writable_file("--json", json_path)
        except UsageError as e:
            print(f"vreplica bench: {e}", file=sys.stderr)
            return 2
    failures: list[dict] = []

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if which == "rings":
        sec = section_rings(plan, log, failures)
        print("\n".join(render_rings(sec, plan)))
    elif which == "stages":
        sec = section_stages(plan, log, failures)
        print("\n".join(stages.render(sec["paths"], plan.sizes, LEGEND, "11",
                                       sec["events_per_packet"])))
    else:
        sec = section_transport(plan, log, failures)
        print("\n".join(transport_table(sec)))
    if json_path:
        Path(json_path).write_text(json.dumps({which: sec, "failures": failures},
                                              indent=1, default=str))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="vreplica bench", description=__doc__.split("\n\n")[0],
               label="vreplica bench")
    p.add_argument("--quick", action="store_true", help="fewer and smaller trials (~1 min)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="trials behind each figure (default 3; 5 for the ring alone, full "
                        "run); 1 is a smoke run whose medians are single samples")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    p.add_argument("--out", metavar="DIR", help="write BENCHMARKS.md and bench.png here "
                   "(default: the repository root)")
    p.add_argument("--only", choices=("transport", "rings", "stages"),
                   help="run one section and print its table (no BENCHMARKS.md): transport "
                        "(9, legacy against modern), rings (10, split against packed) or "
                        "stages (11, CPU per packet per stage on each path)")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.trials is not None:
        if not 1 <= a.trials <= 50:
            print("vreplica bench: --trials: from 1 to 50", file=sys.stderr)
            return 2
        plan = replace(plan, trials=a.trials, micro_trials=a.trials, latency_trials=a.trials)
    if a.only:
        return only_section(plan, a.json, a.only)
    out = Path(a.out) if a.out else ROOT
    try:
        writable_dir("--out", out)
        if out.is_dir():
            for name in ("BENCHMARKS.md", "bench.png"):
                writable_file("--out", out / name)
        if a.json:
            writable_file("--json", a.json)
    except UsageError as e:
        print(f"vreplica bench: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    res = run_bench(plan, log)
    png = out / "bench.png"
    plot(res, plan, png)
    (out / "BENCHMARKS.md").write_text(render_markdown(res, plan, png.name))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    for t in res["targets"]:
        print(f"{t['result']:4}  {t['target']}: {t['measured']}")
    print(f"wrote {out / 'BENCHMARKS.md'} and {png}" + (f" and {a.json}" if a.json else ""))
    return 0

