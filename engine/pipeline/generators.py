"""Schedule generators: a schedule is a pure function of (name, pp, n_micro, virtual stages v).

A generator only chooses the order of each rank's compute actions; `engine.pipeline.lowering`
then inserts the p2p actions. `check_schedule_args` is the one place the arguments are checked;
`build_schedule` runs it before generating anything (`check_schedule_name`, its first part, is
also the config's check of parallel.schedule).
"""
from __future__ import annotations

from typing import Callable

from engine.pipeline.actions import Action, Kind
from engine.pipeline.lowering import place_p2p


def _gpipe(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """All forwards (chunk by chunk), then all backwards in reverse chunk order. Holds n_micro micro-batches."""
    out = []
    for r in range(pp):
        stages = [c * pp + r for c in range(v)]
        acts = [Action(s, Kind.F, mb) for s in stages for mb in range(n_micro)]
        acts += [Action(s, Kind.B, mb) for s in reversed(stages) for mb in range(n_micro)]
        out.append(acts)
    return out


def _one_f_one_b(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """PipeDream-flush 1F1B: pp - r - 1 warm-up forwards, then alternate, then drain the backwards."""
    out = []
    for r in range(pp):
        warmup = min(pp - r - 1, n_micro)
        acts = [Action(r, Kind.F, mb) for mb in range(warmup)]
        for i in range(n_micro - warmup):
            acts += [Action(r, Kind.F, warmup + i), Action(r, Kind.B, i)]
        acts += [Action(r, Kind.B, mb) for mb in range(n_micro - warmup, n_micro)]
        out.append(acts)
    return out


def interleaved_rounds(pp: int, n_micro: int) -> list[int]:
    """Micro-batches per round of the interleaved schedule: a round runs its micro-batches through
    every local chunk before the next round starts. max(1, m // pp) rounds as even as possible
    (earlier rounds take the remainder), so every round has at least pp micro-batches when m ≥ pp
    (the last stage's chunk-c output is back on rank 0 before rank 0 needs it for chunk c + 1) and
    m = k·pp gives Megatron's k rounds of pp. torch (since PR #137783) also rounds m // pp times but
    refuses m that those rounds do not divide evenly; uneven rounds lift that."""
    n_rounds = max(1, n_micro // pp)
    base, extra = divmod(n_micro, n_rounds)
    return [base + (i < extra) for i in range(n_rounds)]


def _interleaved(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: micro-batches advance in rounds (`interleaved_rounds`, pp each
    when pp divides m) through the v local chunks; warm-up is the first round through v - 1
    chunks plus 2 per rank still downstream, then one forward and one backward alternate."""
    units = []          # (chunk, micro-batch) in the order every rank runs its forwards
    start = 0
    for size in interleaved_rounds(pp, n_micro):
        units += [(c, start + i) for c in range(v) for i in range(size)]
        start += size
    first_round = interleaved_rounds(pp, n_micro)[0]
    total = n_micro * v

    def unit(k: int, kind: Kind, r: int) -> Action:
        chunk, mb = units[k]
        if kind == Kind.B:     # backwards visit a round's chunks in reverse
            chunk = v - 1 - chunk
        return Action(chunk * pp + r, kind, mb)

    out = []
    for r in range(pp):
        warmup = min((pp - r - 1) * 2 + (v - 1) * first_round, total)
        acts = [unit(k, Kind.F, r) for k in range(warmup)]
        for i in range(total - warmup):
            acts += [unit(warmup + i, Kind.F, r), unit(i, Kind.B, r)]
        acts += [unit(k, Kind.B, r) for k in range(total - warmup, total)]
        out.append(acts)
    return out


def _zb_h1(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """ZB-H1: 1F1B with each backward split into I (gradient of the input, on the critical path)
    and W (gradient of the weights, which nothing waits for). Rank r runs W(j) right after
    I(j + r) and the last W's at the end, so the deferred W's fill the drain bubble: with
    F = I = W the makespan is 3m + p - 1 for m micro-batches (bubble (p-1)/(3m+p-1), a third of
    1F1B's for large m). A rank holds at most p micro-batches (F done, W not yet), 1F1B's peak on
    the first stage."""
    out = []
    for r, order in enumerate(_one_f_one_b(pp, n_micro, 1)):
        acts, next_w = [], 0
        for a in order:
            if a.kind == Kind.F:
                acts.append(a)
                continue
            acts.append(Action(r, Kind.I, a.mb))
            if a.mb >= r:
                acts.append(Action(r, Kind.W, next_w))
                next_w += 1
        acts += [Action(r, Kind.W, mb) for mb in range(next_w, n_micro)]
        out.append(acts)
    return out


SCHEDULES: dict[str, Callable[[int, int, int], list[list[Action]]]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": _interleaved,
    "zb_h1": _zb_h1,
}


def check_schedule_name(name: str) -> None:
    """Raise ValueError unless `name` is a known schedule: the part of the check a config can
    fail at pp=1 too, where no lists are built (`engine.config.validate`)."""
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule={name!r}: unknown pipeline schedule {name!r}; "
                         f"known schedules: {', '.join(SCHEDULES)}")


def check_schedule_args(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> None:
    """Raise ValueError naming the bad argument and the fix, before any work is done."""
    check_schedule_name(name)
    if pp < 1 or n_micro < 1 or virtual_stages < 1:
        raise ValueError(f"pp={pp}, micro-batches={n_micro} and virtual_stages={virtual_stages} must all be >= 1")
    if name == "interleaved_1f1b":
        if virtual_stages < 2:
            raise ValueError(f"schedule interleaved_1f1b needs parallel.virtual_stages >= 2 (got {virtual_stages}); "
                             f"use schedule 1f1b for one chunk per rank")
    elif name in ("1f1b", "zb_h1") and virtual_stages != 1:
        raise ValueError(f"schedule {name} runs one chunk per rank but parallel.virtual_stages={virtual_stages}; "
                         f"use interleaved_1f1b (or gpipe) for virtual stages")


def build_schedule(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Every rank's ordered action list (compute and p2p) for one training step."""
    check_schedule_args(name, pp, n_micro, virtual_stages)
    return place_p2p(SCHEDULES[name](pp, n_micro, virtual_stages), pp * virtual_stages)
