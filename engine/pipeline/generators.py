"""Schedule generators: a schedule is a pure function of (name, pp, n_micro, virtual stages v).

A generator only chooses the order of each rank's compute actions; `engine.pipeline.lowering`
then inserts the p2p actions. `check_schedule_args` is the one place the arguments are checked;
`build_schedule` runs it before generating anything (`check_schedule_name`, its first part, is
also the config's check of parallel.schedule).
"""
from __future__ import annotations

from typing import Callable

from engine.layout import rank_stages
from engine.pipeline.actions import FORWARD_ONLY, Action, Kind
from engine.pipeline.lowering import place_p2p


def _gpipe(pp: int, n_micro: int, v: int, placement: str = "loop") -> list[list[Action]]:
    """All forwards (chunk by chunk), then all backwards in reverse chunk order. Holds n_micro
    micro-batches. Under either placement a rank's chunks run in stage order, so the forwards flow
    (evaluation runs this schedule's forward half)."""
    out = []
    for r in range(pp):
        stages = rank_stages(r, pp, v, placement)
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


class _VOrder:
    """One rank's compute order under the V placement (chunk 0 = stage r, chunk 1 = stage 2p-1-r),
    built by appending actions with per-chunk counters; `w_fifo` keeps the W's an I left behind."""

    def __init__(self, pp: int, r: int, n_micro: int):
        self.stage = (r, 2 * pp - 1 - r)
        self.n_micro = n_micro
        self.count = {(k, c): 0 for k in (Kind.F, Kind.I, Kind.W) for c in (0, 1)}   # B counts as I
        self.w_fifo: list[Action] = []
        self.acts: list[Action] = []

    def _add(self, kind: Kind, c: int, key: Kind | None = None) -> None:
        key = key or kind
        self.acts.append(Action(self.stage[c], kind, self.count[key, c]))
        self.count[key, c] += 1

    def f(self, c: int) -> bool:
        """Forward the next micro-batch on chunk c, if there is one (chunk 1 only behind chunk 0)."""
        if self.count[Kind.F, c] < self.n_micro and (c == 0 or self.count[Kind.F, 1] < self.count[Kind.F, 0]):
            self._add(Kind.F, c)
            return True
        return False

    def i(self, c: int, *, split: bool = True, w: bool = False) -> bool:
        """Backward the next micro-batch on chunk c (chunk 0 only behind chunk 1): I (its W queued, or
        run right after with ``w``) or, with ``split=False``, one B."""
        n = self.count[Kind.I, c]
        if n < self.count[Kind.F, c] and (c == 1 or n < self.count[Kind.I, 1]):
            if split:
                self._add(Kind.I, c)
                self.w_fifo.append(Action(self.stage[c], Kind.W, n))
                if w:
                    self.w(c)
            else:
                self._add(Kind.B, c, key=Kind.I)
            return True
        return False

    def w(self, c: int | None = None) -> bool:
        """Run the oldest W an I left behind (on chunk c, or on either), if any."""
        for k, a in enumerate(self.w_fifo):
            if c is None or a.stage == self.stage[c]:
                self.acts.append(self.w_fifo.pop(k))
                return True
        return False


def _zbv(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """ZB-V (Qi et al. 2023, §6, https://arxiv.org/abs/2401.10241): two chunks per rank in a V, so
    the last rank turns a micro-batch around in memory and rank 0 holds both the embedding and the
    loss. Rank r warms up with 2(p-r)-1 chunk-0 forwards, then r chunk-1/chunk-0 forward pairs,
    then p-r chunk-1 F-I-W triples; the steady state alternates F-I-W on chunk 0 and chunk 1; the
    drain runs the I's first and fills the gaps with the W's. With F = I = W every rank is busy from
    its first action to its last once n_micro >= 2p-1 (zero bubble inside each rank's span: the
    makespan is 6m + p - 1 chunk-units, the p-1 being the staircase of the ranks' start times), and
    a rank holds at most 2p chunk activations: p stages' worth, 1F1B's peak on its first stage. Any
    n_micro >= 1 is valid; below 2p-1 there are bubbles."""
    out = []
    for r in range(pp):
        o = _VOrder(pp, r, n_micro)
        for _ in range(2 * (pp - r) - 1):
            o.f(0)
        for _ in range(r):
            o.f(1)
            o.f(0)
        for _ in range(pp - r):
            o.f(1)
            o.i(1, w=True)
        while o.count[Kind.F, 1] < o.count[Kind.F, 0] or o.count[Kind.F, 0] < n_micro:
            o.f(0)
            o.i(0, w=True)
            o.f(1)
            o.i(1, w=True)
        for _ in range(r):
            o.i(0)
            o.i(1)
        for _ in range(pp - r):
            o.i(0)
            o.w(0)
        while o.i(1) or o.i(0):
            pass
        while o.w(1) or o.w(0):
            pass
        out.append(o.acts)
    return out


def _dualpipev(pp: int, n_micro: int, v: int) -> list[list[Action]]:
    """DualPipeV (DeepSeek's DualPipe cut in half, https://github.com/deepseek-ai/DualPipe): the V
    placement fed from one end, whose steady state pairs the forward of one micro-batch with the
    full backward (B) of another on the other chunk — an "F&B" pair, adjacent in the list: the F's
    send goes out before the B runs (overlapping it), and the B's receive is posted as early as the
    lowering proves safe (`hoist_receives`), before the F where it can be. Warm-up and drain split backwards into I + W
    (zero-bubble) to fill the ramps: rank r runs 2(p-r-1) chunk-0 forwards, r+1 chunk-0/chunk-1
    forward pairs, p-r-1 I-W-F's on chunk 1, then m-2p+r+1 F&B double-pairs (F0&B1, F1&B0), p-r-1
    B1-F1&B0's, r+1 backward pairs (the second half split), p-r-1 W-I's on chunk 0 and the last W's.
    Peak 2p+1 chunk activations per rank (PP+1 in the DualPipe README); needs n_micro >= 2p."""
    out = []
    for r in range(pp):
        o = _VOrder(pp, r, n_micro)
        for _ in range(2 * (pp - r - 1)):
            o.f(0)
        for _ in range(r + 1):
            o.f(0)
            o.f(1)
        for _ in range(pp - r - 1):
            o.i(1)
            o.w()
            o.f(1)
        for _ in range(n_micro - 2 * pp + r + 1):      # F&B pairs
            o.f(0)
            o.i(1, split=False)
            o.f(1)
            o.i(0, split=False)
        for _ in range(pp - r - 1):
            o.i(1, split=False)
            o.f(1)
            o.i(0, split=False)
        split = False
        for k in range(r + 1):   # the second half of these backwards split, to fill the drain with W's
            if k == (r + 1) // 2 and r % 2 == 1:
                split = True
            o.i(1, split=split)
            if k == (r + 1) // 2 and r % 2 == 0:
                split = True
            o.i(0, split=split)
        for _ in range(pp - r - 1):
            o.w()
            o.i(0, split=split)
        while o.w():
            pass
        out.append(o.acts)
    return out


SCHEDULES: dict[str, Callable[[int, int, int], list[list[Action]]]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": _interleaved,
    "zb_h1": _zb_h1,
    "zbv": _zbv,
    "dualpipev": _dualpipev,
}
# where a schedule puts its stages (engine.layout.stage_rank); every other schedule loops
PLACEMENT = {"zbv": "v", "dualpipev": "v"}


def schedule_placement(name: str) -> str:
    """The stage placement schedule ``name`` runs on: "v" for zbv and dualpipev, else "loop"."""
    return PLACEMENT.get(name, "loop")


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
    elif name in PLACEMENT:
        if virtual_stages != 2:
            raise ValueError(f"schedule {name} runs two chunks per rank in a V (rank r holds stages r and "
                             f"2·pp-1-r) but parallel.virtual_stages={virtual_stages}; set parallel.virtual_stages=2")
        if name == "dualpipev" and n_micro < 2 * pp:
            raise ValueError(f"schedule dualpipev needs at least 2·pp = {2 * pp} micro-batches, got {n_micro}; "
                             f"raise train.global_batch_size or lower parallel.micro_batch_size "
                             f"(or use zbv, which runs any count)")
    elif name in ("1f1b", "zb_h1") and virtual_stages != 1:
        raise ValueError(f"schedule {name} runs one chunk per rank but parallel.virtual_stages={virtual_stages}; "
                         f"use interleaved_1f1b (or gpipe) for virtual stages")


def build_schedule(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Every rank's ordered action list (compute and p2p) for one training step."""
    check_schedule_args(name, pp, n_micro, virtual_stages)
    return place_p2p(SCHEDULES[name](pp, n_micro, virtual_stages), pp * virtual_stages)


def build_forward_only(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Evaluation's lists for a launch running schedule ``name``: gpipe's forward half on that
    schedule's placement (forwards and their messages only)."""
    check_schedule_args(name, pp, n_micro, virtual_stages)
    order = _gpipe(pp, n_micro, virtual_stages, schedule_placement(name))
    return [[a for a in acts if a.kind in FORWARD_ONLY] for acts in place_p2p(order, pp * virtual_stages)]
