"""Print a pipeline schedule's action lists and its simulated timeline.

    python scripts/show_schedule.py --schedule 1f1b --pp 4 --micro 8 [--virtual 1] [--f 1 --b 2 --w 1] [--width 100]
                                    [--trace timeline.json]   # Chrome/Perfetto trace of the simulated timeline

Costs are per chunk of 1/v of a stage's layers, so schedules with different v compare fairly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.pipeline.actions import format_actions  # noqa: E402
from engine.pipeline.generators import SCHEDULES, build_schedule, schedule_placement  # noqa: E402
from engine.pipeline.simulate import simulate, uniform_cost  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--virtual", type=int, default=None,
                    help="chunks per rank (default 2 for the V schedules zbv and dualpipev, else 1)")
    ap.add_argument("--f", type=float, default=1.0, help="forward cost of a whole stage")
    ap.add_argument("--b", type=float, default=2.0, help="backward cost of a whole stage (I + W)")
    ap.add_argument("--w", type=float, default=1.0, help="weight-gradient part of the backward (zb_h1)")
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--p2p", type=float, default=0.0, help="time of one p2p batch, in the same units")
    ap.add_argument("--network", choices=("nccl", "gloo"), default="nccl",
                    help="nccl: one p2p stream per rank, sends wait for their receivers; gloo: buffered sends")
    ap.add_argument("--actions", action="store_true", help="also print every rank's action list")
    ap.add_argument("--trace", type=Path, default=None,
                    help="write the simulated timeline as a Chrome/Perfetto trace (JSON) to this file")
    a = ap.parse_args()
    if a.virtual is None:
        a.virtual = 2 if schedule_placement(a.schedule) == "v" else 1
    actions = build_schedule(a.schedule, a.pp, a.micro, a.virtual)
    if a.actions:
        print(format_actions(actions))
    v = a.virtual
    result = simulate(actions, uniform_cost(a.f / v, a.b / v, a.w / v), a.p2p / v, network=a.network)
    print(result.chart(a.width))
    idle = result.idle_in_span
    print(f"idle inside each rank's span {[round(x, 3) for x in idle]} (the zero-bubble papers' bubble)")
    if a.trace is not None:
        a.trace.write_text(json.dumps(result.chrome_trace()))
        print(f"trace written to {a.trace} (open it in https://ui.perfetto.dev or chrome://tracing)")


if __name__ == "__main__":
    main()
