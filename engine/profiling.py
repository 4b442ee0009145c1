"""``profile.steps=[a, b]``: a torch.profiler Chrome trace of training steps a..b on every rank.

Steps are numbered as in ``metrics.jsonl`` (the first optimizer step of a run is 1). The profiler
starts before step a and stops after step b; each rank then writes
``<run_dir>/profile/rank<NNNNN>_steps<a>-<b>.json`` (open it in https://ui.perfetto.dev or
chrome://tracing). A resumed run that starts inside the window profiles the rest of it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def trace_path(run_dir: Path, rank: int, steps: list[int]) -> Path:
    return Path(run_dir) / "profile" / f"rank{rank:05d}_steps{steps[0]}-{steps[1]}.json"


class StepProfiler:
    """Wraps each training step: `step(n)` is a context for step ``n`` (1-based)."""

    def __init__(self, steps: list[int] | None, *, run_dir: Path, rank: int, device: torch.device):
        self.steps = list(steps) if steps else None
        self.path = trace_path(run_dir, rank, self.steps) if self.steps else None
        self.device = device
        self.prof = None

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=True)
        self.prof.__enter__()

    def _stop(self) -> None:
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        self.prof = None

    def step(self, n: int):
        """Context for step ``n``: starts the trace at the window's first step (or the first step of a
        resume inside it), labels the step, and writes the trace after the window's last."""
        return _StepContext(self, n)

    def close(self) -> None:
        """A run that ends inside the window (a stop request) still writes what it recorded."""
        if self.prof is not None:
            self._stop()


class _StepContext:
    def __init__(self, owner: StepProfiler, n: int):
        self.owner, self.n, self.label = owner, n, None

    def __enter__(self):
        o = self.owner
        if o.steps and o.steps[0] <= self.n <= o.steps[1]:
            if o.prof is None:
                o._start()
            self.label = record_function(f"step {self.n}")
            self.label.__enter__()
        return self

    def __exit__(self, *exc):
        o = self.owner
        if self.label is not None:
            self.label.__exit__(*exc)
            if self.n == o.steps[1]:
                o._stop()
        return False
