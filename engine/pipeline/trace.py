"""`parallel.trace_steps=[a, b]`: the measured per-rank action timeline of training steps a..b, as a
Chrome/Perfetto trace in the format of `scripts/show_schedule.py --trace` (the simulated one).

Each pipeline rank's `PipelineRunner` records, for a traced step, one slice per compute action, one
per p2p batch (posting), and on a CPU one per wait for a received tensor (`wait 1RF3`), so a rank's
idle time shows where it is spent. On CUDA the slices come from the actions' completion events (see
`PipelineRunner._gpu_trace_rows`): waits are then inside the compute slice that waited. At the last
traced step (or the step a run stops at, which every rank agrees on) the ranks' slices are gathered
and rank 0 writes ``<run_dir>/trace/steps_<a>-<b>.json``: a process per rank (``pp p, tp t, dp d``)
with a compute track and a p2p/wait track. Each step is placed at its start on the rank's wall
clock (`time.time`), so ranks of one node line up exactly; across nodes the alignment is as good as
their clock synchronization.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from engine.mesh import Mesh


class StepTracer:
    def __init__(self, steps: list[int] | None, *, run_dir: Path, mesh: Mesh):
        self.window = tuple(steps) if steps else None
        self.run_dir, self.mesh = Path(run_dir), mesh
        self.rows: list[dict] = []
        self.path: Path | None = None

    def active(self, step: int) -> bool:
        return self.window is not None and self.window[0] <= step <= self.window[1]

    def record(self, step: int, rows: list[tuple[str, str, float, float]], step_wall_start: float) -> None:
        """One traced step's slices (seconds from the step's start, which was ``step_wall_start``)."""
        for name, cat, start, end in rows:
            self.rows.append({"name": name, "cat": cat, "step": step, "t": step_wall_start + start,
                              "dur": max(end - start, 0.0) * 1e6})

    def finish(self) -> Path | None:
        """Collective over the world: gather every rank's slices; rank 0 writes the trace file."""
        m = self.mesh
        mine = {"rank": m.rank, "coords": f"pp {m.pp_rank}, tp {m.tp_rank}, dp {m.dp_rank}", "rows": self.rows}
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.rows = []
        if m.rank != 0:
            return None
        origin = min((r["t"] for g in gathered for r in g["rows"]), default=0.0)
        events = []
        for g in gathered:
            pid = g["rank"]
            events.append({"ph": "M", "name": "process_name", "pid": pid,
                           "args": {"name": f"rank {pid} ({g['coords']})"}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}})
            for tid, name in ((0, "compute"), (1, "p2p and waits")):
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            for r in g["rows"]:
                events.append({"ph": "X", "name": r["name"], "cat": r["cat"], "pid": pid,
                               "tid": 0 if r["cat"] == "compute" else 1, "ts": (r["t"] - origin) * 1e6, "dur": r["dur"],
                               "args": {"step": r["step"]}})
        a, b = self.window
        self.path = self.run_dir / "trace" / f"steps_{a}-{b}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                         "otherData": {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                       "steps": [a, b]}}))
        return self.path
