"""The planner's private fallback for `engine.pipeline.schedules` / `engine.pipeline.simulate`.

Used only while the pipeline package is absent; same call shapes:
``build_schedule(name, pp, n_micro, virtual_stages=1) -> list[list[Action]]`` (one ordered list per
pp rank; no send/recv actions: the simulator charges ``p2p_time`` on every cross-rank dependency) and
``simulate(actions, cost, p2p_time=0.0) -> SimResult``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Action:
    kind: str  # F, B, I (backward for input), W (backward for weights)
    mb: int
    stage: int  # global virtual stage; it lives on rank stage % pp


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    bubble: float  # 1 - mean busy fraction
    peak_activations: list[int]
    timeline: list[list[tuple[float, float, Action]]] = field(default_factory=list)

    def chart(self, width: int = 80) -> str:
        rows = []
        for r, tl in enumerate(self.timeline):
            line = [" "] * width
            for t0, t1, a in tl:
                for x in range(int(t0 / self.makespan * width), max(int(t1 / self.makespan * width), 1)):
                    line[min(x, width - 1)] = a.kind
            rows.append(f"{r:>3} |{''.join(line)}|")
        return "\n".join(rows)


def build_schedule(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> list[list[Action]]:
    if name == "gpipe":
        return [[Action("F", m, r) for m in range(n_micro)] + [Action("B", m, r) for m in range(n_micro)]
                for r in range(pp)]
    if name == "1f1b":
        return [_one_f_one_b(r, pp, n_micro) for r in range(pp)]
    if name == "zb_h1":
        return [_zb_h1(r, pp, n_micro) for r in range(pp)]
    if name == "interleaved_1f1b":
        return [_interleaved(r, pp, n_micro, virtual_stages) for r in range(pp)]
    raise ValueError(f"unknown schedule {name!r}; known: gpipe, 1f1b, interleaved_1f1b, zb_h1")


def _one_f_one_b(r, pp, m):
    warm = min(pp - r - 1, m)
    acts = [Action("F", i, r) for i in range(warm)]
    for i in range(m - warm):
        acts += [Action("F", warm + i, r), Action("B", i, r)]
    return acts + [Action("B", i, r) for i in range(m - warm, m)]


def _zb_h1(r, pp, m):
    """1F1B with the backward split into I (input) and W (weights), W right after its I (Qi et al.
    2023, ZB-H1): only I sits on the critical path back through the stages, so the drain shortens
    while the activation memory stays that of 1F1B."""
    warm = min(pp - r - 1, m)
    acts = [Action("F", i, r) for i in range(warm)]
    for i in range(m - warm):
        acts += [Action("F", warm + i, r), Action("I", i, r), Action("W", i, r)]
    for i in range(m - warm, m):
        acts += [Action("I", i, r), Action("W", i, r)]
    return acts


def _interleaved(r, pp, m, v):
    """Megatron's interleaved 1F1B: micro-batches in groups of pp, each group through chunk 0..v-1;
    backwards in the same order with the chunks reversed."""
    total = m * v

    def unit(k, backward):
        chunk = (k // pp) % v
        if backward:
            chunk = v - 1 - chunk
        mb = (k // (pp * v)) * pp + k % pp
        return mb, chunk * pp + r

    warm = min((pp - r - 1) * 2 + (v - 1) * pp, total)
    acts = [Action("F", *unit(k, False)) for k in range(warm)]
    for k in range(total - warm):
        acts += [Action("F", *unit(warm + k, False)), Action("B", *unit(k, True))]
    return acts + [Action("B", *unit(k, True)) for k in range(total - warm, total)]


def simulate(actions: list[list[Action]], cost, p2p_time: float = 0.0) -> SimResult:
    """Each rank runs its list in order; an action starts when the rank is free and its inputs are
    ready: F(mb, s) after F(mb, s-1), B/I(mb, s) after F(mb, s) and B/I(mb, s+1), W after I.
    A dependency on another rank adds ``p2p_time``."""
    pp = len(actions)
    n_stages = 1 + max(a.stage for acts in actions for a in acts)
    done: dict[tuple, float] = {}
    clock, pos = [0.0] * pp, [0] * pp
    busy = [0.0] * pp
    timeline: list[list] = [[] for _ in range(pp)]
    live, peak = [0] * pp, [0] * pp
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(actions[r]):
                a = actions[r][pos[r]]
                deps = _deps(a, n_stages)
                if any(d not in done for d, _ in deps):
                    break
                ready = max([clock[r]] + [done[d] + (p2p_time if s % pp != r else 0.0) for d, s in deps])
                t = cost(r, a)
                end = ready + t
                done[(a.kind if a.kind != "B" else "I", a.mb, a.stage)] = end
                if a.kind == "B":
                    done[("W", a.mb, a.stage)] = end
                clock[r], busy[r] = end, busy[r] + t
                timeline[r].append((ready, end, a))
                live[r] += a.kind == "F"
                live[r] -= a.kind in ("B", "W")
                peak[r] = max(peak[r], live[r])
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: actions[r][pos[r]] for r in range(pp) if pos[r] < len(actions[r])}
            raise ValueError(f"schedule deadlocks: waiting actions {stuck}")
    makespan = max(clock)
    bubble = 1 - sum(busy) / (pp * makespan) if makespan > 0 else 0.0
    return SimResult(makespan, busy, bubble, peak, timeline)


def _deps(a: Action, n_stages: int) -> list[tuple[tuple, int]]:
    """(key of the finished action it waits for, that action's stage)."""
    if a.kind == "F":
        return [(("F", a.mb, a.stage - 1), a.stage - 1)] if a.stage > 0 else []
    if a.kind in ("B", "I"):
        deps = [(("F", a.mb, a.stage), a.stage)]
        if a.stage < n_stages - 1:
            deps.append((("I", a.mb, a.stage + 1), a.stage + 1))
        return deps
    return [(("I", a.mb, a.stage), a.stage)]  # W
