"""vreplica fuzz: the hostile-guest machine, on split or packed rings, from the command line."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

import qemuproc.virtio as qvirtio
from vreplica.fuzz.machine import STATS_KEYS, VirtioNetFuzz, fuzz_settings, stats
from vreplica.fuzz.packed import VirtioNetPackedFuzz
from vreplica.run.options import Parser


def run(examples: int, steps: int = 40, ring: str = "split") -> dict[str, Any]:
    """Run the machine (``ring``: split, vreplica.fuzz.packed's, or the vhost-user backend's,
    vreplica.fuzz.vhost_user) for ``examples`` examples; raises on the first broken
    property."""
    machine: type[RuleBasedStateMachine] = VirtioNetFuzz
    if ring == "packed":
        machine = VirtioNetPackedFuzz
    elif ring == "vhost-user":
        from vreplica.fuzz.vhost_user import VhostUserBackendFuzz

        machine = VhostUserBackendFuzz
    for k in STATS_KEYS:
        stats[k] = 0
    stats["messages"] = set()
    quiet = qvirtio.error_report
    qvirtio.error_report = lambda message: None
    try:
        run_state_machine_as_test(machine, settings=fuzz_settings(examples, steps))
    finally:
        qvirtio.error_report = quiet
    return dict(stats)


def main(argv: list[str]) -> int:
    p = Parser(prog="vreplica fuzz", label="vreplica fuzz",
               description="A hostile guest against the device's ring code.")
    p.add_argument("--examples", type=int, default=200, help="state-machine runs (default 200)")
    p.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    p.add_argument("--ring", choices=("split", "packed", "vhost-user"), default="split",
                   help="the rings the hostile guest writes (packed: VIRTIO_F_RING_PACKED; "
                        "vhost-user: split rings served by the vhost-user backend)")
    a = p.parse_args(argv)
    if a.examples < 1 or a.steps < 1:
        print("vreplica fuzz: --examples and --steps must be at least 1", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        s = run(a.examples, a.steps, a.ring)
    except KeyboardInterrupt:
        print("vreplica fuzz: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the steps to reproduce are in its notes
        traceback.print_exception(e)
        print(f"fuzz: FAILED after {stats['examples']} examples: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}")
        return 1
    dt = time.monotonic() - t0
    print(f"fuzz: {s['examples']} examples, {s['steps']} steps in {dt:.1f} s "
          f"({s['examples'] / dt:.1f} examples/s): no failure; {s['errors']} device errors "
          f"({len(s['messages'])} kinds), {s['tx_frames']} frames out, {s['rx_frames']} "
          f"checked in, {s['maps']} maps, {s['refused']} refused outside RAM")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
