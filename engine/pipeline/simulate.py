"""Action lists + per-action costs -> timeline, makespan, bubble and peak activations per rank.

The simulation executes the lists exactly as the runtime does (see schedules.run_batches):
compute actions back to back, consecutive p2p actions as one batch that waits for its partners.
The planner uses it to compare schedules and micro-batch counts without running anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from engine.pipeline.schedules import Action, run_batches

CHART_GLYPH = {"F": "F", "B": "B", "I": "I", "W": "W"}


@dataclass
class SimResult:
    makespan: float
    busy: list[float]                      # compute time per rank
    bubble: float                          # 1 - sum(busy) / (pp * makespan)
    peak_activations: list[int]            # per rank: max (micro-batch, chunk) activations held at once
    timeline: list[list[tuple[float, float, Action]]]

    @property
    def pp(self) -> int:
        return len(self.timeline)

    def chart(self, width: int = 100) -> str:
        """ASCII timeline: one row per rank, each compute action drawn as its label ("F3" or, with
        several chunks per rank, "F3c1") stretched to its duration; '.' is idle or waiting."""
        if self.makespan <= 0:
            return "\n".join(f"rank {r} |" for r in range(self.pp))
        scale = width / self.makespan
        multi_chunk = any(a.stage >= self.pp for row in self.timeline for _, _, a in row)
        rows = []
        for r, row in enumerate(self.timeline):
            cells = ["."] * width
            for start, end, a in row:
                if not a.is_compute:
                    continue
                lo, hi = round(start * scale), max(round(end * scale), round(start * scale) + 1)
                label = f"{a.kind}{a.mb}" + (f"c{a.stage}" if multi_chunk else "")
                text = (label + "-" * (hi - lo))[: hi - lo] if hi - lo > 1 else a.kind
                for k, ch in enumerate(text):
                    if lo + k < width:
                        cells[lo + k] = ch
            rows.append(f"rank {r} |{''.join(cells)}|")
        rows.append(f"makespan {self.makespan:g}, bubble {self.bubble:.1%}, "
                    f"peak activations per rank {self.peak_activations}")
        return "\n".join(rows)


def simulate(actions: Sequence[Sequence[Action]], cost: Callable[[int, Action], float],
             p2p_time: float = 0.0, *, rendezvous: bool = False) -> SimResult:
    """Run the lists through the event simulation; `cost(rank, action)` gives each compute action's
    duration, every p2p batch costs `p2p_time` once the sends its receives wait for are posted.
    Sends are buffered as in the runtime; `rendezvous=True` makes them wait for their receives too.
    Raises ValueError if the lists deadlock."""
    pp = len(actions)
    timeline, makespan = run_batches(actions, pp, cost, p2p_time, rendezvous=rendezvous)
    busy = [sum(e - s for s, e, a in row if a.is_compute) for row in timeline]
    bubble = 1.0 - sum(busy) / (pp * makespan) if makespan > 0 else 0.0
    return SimResult(makespan=makespan, busy=busy, bubble=bubble,
                     peak_activations=[_peak_held(row) for row in timeline], timeline=timeline)


def _peak_held(row: list[tuple[float, float, Action]]) -> int:
    """Activations of a (micro-batch, stage) are held from its F until its B (or its W, which still
    needs the stage's inputs) has finished."""
    held = peak = 0
    for _, _, a in row:               # a rank's actions run in list order, so list order is time order
        if a.kind == "F":
            held += 1
            peak = max(peak, held)
        elif a.kind in ("B", "W"):
            held -= 1
    return peak


def uniform_cost(f: float = 1.0, b: float = 2.0, w: float | None = None) -> Callable[[int, Action], float]:
    """Equal cost on every rank: F = f, B = b, and for split backwards I = b - w, W = w (w defaults to b/2)."""
    w = b / 2 if w is None else w
    table = {"F": f, "B": b, "I": b - w, "W": w}
    return lambda rank, a: table[a.kind]
