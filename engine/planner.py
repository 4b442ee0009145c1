"""Stage-partition planner: an exact search over contiguous partitions, on `engine.cost_model`.

Given a model, a mesh (tp, pp, dp), a global batch and a device, it chooses how many layers each
pipeline stage holds, the schedule and the micro-batch size, so that the simulated step time is
smallest and every stage's peak memory (parameters, gradients and optimizer state, plus the
activations the schedule keeps in flight on that stage) fits the device.

* `best_partition` — exact dynamic programming over contiguous partitions: first the smallest
  bottleneck stage time under the memory limit, then, among partitions with that bottleneck, the
  smallest peak memory fraction, then the most even stage times.
* `plan` — for every schedule, virtual-stage count and micro-batch size: schedule → in-flight
  activations per rank → partition → simulated step time (`engine.pipeline.simulate`); the even
  split is always simulated too, so a plan is never worse than it under the model.
* `format_plan`, `plan_yaml`, `write_plan`, `plan_from_config` — the report, the Hydra override
  file and the entry point behind scripts/plan_stages.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from engine.cost_model import (DEVICES, GB, CostModel, DeviceProfile, Item, Setup,  # noqa: F401 (re-exported)
                               get_device, profile_items)
from engine.layout import check_end_only_empty, even_split
from engine.pipeline.actions import Kind
from engine.pipeline.generators import SCHEDULES, build_schedule, check_schedule_args
from engine.pipeline.simulate import simulate


# -- stages -------------------------------------------------------------------------------------------
def stage_items(items: list[Item], bounds: tuple[int, int], n_stages: int, stage: int, tied: bool) -> list[Item]:
    """The items virtual stage ``stage`` holds for layers [start, stop): the embedding on the first,
    the head on the last (and its own embedding copy there with tied embeddings)."""
    start, stop = bounds
    held = items[1 + start:1 + stop]
    if stage == 0:
        held = [items[0]] + held
    if stage == n_stages - 1:
        head = items[-1]
        if not tied:  # untied: the head has its own V×d projection; tied: it reuses the (copied) table
            held = held + [head]
        else:
            held = held + [replace(head, params=head.params if stage != 0 else head.params - items[0].params)]
    return held


def stage_time(held: list[Item]) -> float:
    return sum(i.fwd_s + i.bwd_s for i in held)


def stage_memory(held: list[Item], in_flight: float, bytes_per_param: float) -> float:
    """Parameters and optimizer state, the activations of ``in_flight`` micro-batches, and the largest
    transient working set one backward needs (a recomputed layer, the logits' gradient)."""
    return (sum(i.params for i in held) * bytes_per_param + in_flight * sum(i.act_bytes for i in held)
            + max((i.work_bytes for i in held), default=0.0))


def min_layers(n_stages: int, empty_ends: bool) -> list[int]:
    """The fewest layers each stage may hold: one, or none on the first and last stage with
    ``empty_ends`` (an embedding-only first chunk, a head-only last chunk: layers_per_stage entries of 0)."""
    return [0 if empty_ends and n_stages > 1 and s in (0, n_stages - 1) else 1 for s in range(n_stages)]


def _stage_costs(items, n_stages, in_flight, bytes_per_param, tied, least):
    """(time, memory bytes) of every (stage, first layer, stop layer) a partition may use, from
    prefix sums over the layers plus each stage's extras (embedding, head): O(stages × layers²)."""
    L = len(items) - 2
    t, p, a = [0.0], [0], [0.0]
    for it in items[1:-1]:
        t.append(t[-1] + it.fwd_s + it.bwd_s)
        p.append(p[-1] + it.params)
        a.append(a[-1] + it.act_bytes)
    out = {}
    for s in range(n_stages):
        extra = stage_items(items, (0, 0), n_stages, s, tied)  # what stage s holds besides layers
        et, ep, ea = stage_time(extra), sum(i.params for i in extra), sum(i.act_bytes for i in extra)
        ew = max((i.work_bytes for i in extra), default=0.0)
        lo, hi = sum(least[:s]), L - sum(least[s + 1:])
        for i in range(lo, hi - least[s] + 1):
            work = ew
            for j in range(i, hi + 1):
                if j > i:
                    work = max(work, items[j].work_bytes)
                if j - i < least[s]:
                    continue
                out[(s, i, j)] = (t[j] - t[i] + et, (p[j] - p[i] + ep) * bytes_per_param
                                  + in_flight[s] * (a[j] - a[i] + ea) + work)
    return out


def _dp(costs, n_stages: int, L: int, score, combine, admissible, least):
    """Exact DP over contiguous partitions of L layers into n_stages stages of ≥ least[s] layers.
    best[s][j] is the best combined score of stages 0..s covering layers [0, j)."""
    INF = math.inf
    best = [[INF] * (L + 1) for _ in range(n_stages)]
    arg = [[None] * (L + 1) for _ in range(n_stages)]
    for s in range(n_stages):
        lo, hi = sum(least[:s]), L - sum(least[s + 1:])
        for j in range(lo + least[s], hi + 1):
            for i in ([0] if s == 0 else range(lo, j - least[s] + 1)):
                c = costs[(s, i, j)]
                if not admissible(c):
                    continue
                prev = 0.0 if s == 0 else best[s - 1][i]
                if prev == INF:
                    continue
                v = combine(prev, score(c))
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    if best[-1][L] == INF:
        return None, None
    cuts, j = [], L
    for s in range(n_stages - 1, -1, -1):
        i = arg[s][j]
        cuts.append(j - i)
        j = i
    return best[-1][L], cuts[::-1]


def best_partition(items: list[Item], n_stages: int, *, in_flight: list[float], bytes_per_param: float,
                   mem_limit: float, tied: bool = False, empty_ends: bool = False) -> list[int] | None:
    """Layers per stage minimizing, exactly and in this order: the bottleneck stage time, then the
    largest memory fraction, then the sum of squared stage times; each stage ≥ 1 layer (the first and
    last ≥ 0 with ``empty_ends``) and within ``mem_limit`` bytes. ``in_flight[s]``: micro-batches of
    activations stage s holds at its peak. Returns None when no partition fits. Dynamic
    programming, O(stages × layers²)."""
    L = len(items) - 2
    least = min_layers(n_stages, empty_ends)
    if sum(least) > L:
        return None
    costs = _stage_costs(items, n_stages, in_flight, bytes_per_param, tied, least)
    fits = lambda c: c[1] <= mem_limit  # noqa: E731
    bottleneck, _ = _dp(costs, n_stages, L, lambda c: c[0], max, fits, least)
    if bottleneck is None:
        return None
    tol = bottleneck * (1 + 1e-9)
    peak_mem, _ = _dp(costs, n_stages, L, lambda c: c[1], max, lambda c: fits(c) and c[0] <= tol, least)
    _, cuts = _dp(costs, n_stages, L, lambda c: c[0] ** 2, lambda a, b: a + b,
                  lambda c: fits(c) and c[0] <= tol and c[1] <= peak_mem * (1 + 1e-9), least)
    return cuts


def min_memory(items: list[Item], n_stages: int, *, in_flight: list[float], bytes_per_param: float,
               tied: bool = False, empty_ends: bool = False) -> float:
    """The smallest achievable peak stage memory (bytes) over all partitions: for infeasible reports."""
    least = min_layers(n_stages, empty_ends)
    if sum(least) > len(items) - 2:
        return math.inf
    costs = _stage_costs(items, n_stages, in_flight, bytes_per_param, tied, least)
    peak, _ = _dp(costs, n_stages, len(items) - 2, lambda c: c[1], max, lambda c: True, least)
    return math.inf if peak is None else peak


# -- schedules and the simulator ----------------------------------------------------------------------
def in_flight_counts(actions_per_rank) -> list[dict[int, int]]:
    """Per rank, {virtual stage: micro-batches of activations held} at the moment the rank holds the
    most in total: +1 at a forward, -1 once its backward (B, or W for split backwards) has run.
    Depends only on each rank's action order, not on timing."""
    peaks = []
    for acts in actions_per_rank:
        live: dict[int, int] = {}
        total = best_total = 0
        at_best: dict[int, int] = {}
        for a in acts:
            if a.kind not in (Kind.F, Kind.B, Kind.W):
                continue
            step = 1 if a.kind == Kind.F else -1
            live[a.stage] = live.get(a.stage, 0) + step
            total += step
            if total > best_total:
                best_total, at_best = total, {k: v for k, v in live.items() if v}
        peaks.append(at_best)
    return peaks


# -- the plan ------------------------------------------------------------------------------------------
@dataclass
class StageReport:
    rank: int
    chunks: list[tuple[int, int]]  # (virtual stage, layers) on this rank
    layer_ranges: list[tuple[int, int]]
    params: int
    peak_mem: float
    fwd_s: float  # per micro-batch, all chunks of the rank
    bwd_s: float


@dataclass
class Plan:
    schedule: str
    virtual_stages: int
    micro_batch_size: int
    n_micro: int
    layers_per_stage: list[int]
    step_time_s: float
    bubble: float
    stages: list[StageReport]
    tokens_per_s: float
    mfu: float | None
    even_step_time_s: float | None  # the even split under the same schedule, or None if it does not fit
    device: str = ""
    considered: list[tuple] = field(default_factory=list)  # (schedule, v, mb, step time or reason)
    precision: str = "fp32"  # the compute dtype it was costed at: bf16 on GPU profiles, fp32 on the CPU

    def overrides(self) -> dict:
        return {"parallel": {"layers_per_stage": list(self.layers_per_stage), "schedule": self.schedule,
                             "virtual_stages": self.virtual_stages, "micro_batch_size": self.micro_batch_size}}


class Infeasible(ValueError):
    pass


@dataclass
class Candidate:
    schedule: str
    v: int
    mb: int
    n_micro: int
    actions: list  # per rank, the compute actions in order (the generator's output, before p2p lowering)
    peaks: list  # per rank: {virtual stage: count}


def stage_ranks(actions_per_rank, n_stages: int) -> list[int]:
    """The rank that runs each virtual stage, read off the schedule's own action lists, so the
    planner follows any placement `engine.pipeline.generators.SCHEDULES` holds: k % pp for
    Megatron's interleaving, stages r and 2·pp − 1 − r on rank r for the V schedules. A stage no
    rank computes falls back to k % pp."""
    owner: dict[int, int] = {}
    for r, acts in enumerate(actions_per_rank):
        for a in acts:
            if a.is_compute:
                owner.setdefault(a.stage, r)
    pp = len(actions_per_rank)
    return [owner.get(k, k % pp) for k in range(n_stages)]


def _evaluate(setup: Setup, device: DeviceProfile, items, cand: Candidate, cuts: list[int], cm: CostModel):
    """Simulated step time, bubble and per-rank reports of a partition."""
    p, S = setup.pp, len(cuts)
    rank_of = stage_ranks(cand.actions, S)
    starts = [sum(cuts[:k]) for k in range(S)]
    held = [stage_items(items, (starts[k], starts[k] + cuts[k]), S, k, setup.mcfg.tie_embeddings) for k in range(S)]
    times = {}
    for k in range(S):
        times[k] = {"F": sum(i.fwd_s for i in held[k]), "B": sum(i.bwd_s for i in held[k]),
                    "I": sum(i.bwd_input_s for i in held[k]), "W": sum(i.bwd_weight_s for i in held[k])}

    def cost(rank, a):
        return times[a.stage].get(a.kind, 0.0)

    makespan, busy, ends = simulate_step(setup, cand, cost, cm.p2p_time())
    bubble = 1.0 - sum(busy) / (p * makespan) if makespan > 0 else 0.0
    reports, step = [], 0.0
    bpp = cm.state_bytes_per_param()
    for r in range(p):
        ks = [k for k in range(S) if rank_of[k] == r]
        peak = cand.peaks[r]
        params = sum(i.params for k in ks for i in held[k])
        mine = [i for k in ks for i in held[k]]
        mem = (params * bpp + sum(peak.get(k, 0) * sum(i.act_bytes for i in held[k]) for k in ks)
               + max((i.work_bytes for i in mine), default=0.0))
        fwd, bwd = sum(times[k]["F"] for k in ks), sum(times[k]["B"] for k in ks)
        reports.append(StageReport(r, [(k, cuts[k]) for k in ks], [(starts[k], starts[k] + cuts[k]) for k in ks],
                                   params, mem, fwd, bwd))
        # this rank's dp reduction overlaps its last micro-batch's backward; then the optimizer step
        step = max(step, ends[r] + cm.dp_exposed_time(params, bwd) + cm.optimizer_time(params))
    return step, bubble, reports


# Above this many micro-batches per pp rank the step is simulated at 2·pp and 3·pp micro-batches and
# extrapolated (see `simulate_step`).
EXTRAPOLATE_ABOVE = 4


def simulate_step(setup: Setup, cand: Candidate, cost, p2p_time: float, *, extrapolate: bool = True):
    """(makespan, busy seconds per rank, end of each rank's last action) of the candidate's schedule.
    With many micro-batches (more than `EXTRAPOLATE_ABOVE` × pp) the schedule is simulated at 2·pp and
    3·pp micro-batches and every figure extended linearly: once a pipeline schedule is in its steady
    state each further micro-batch adds the same time (a max-plus linear system past its transient),
    which the lowering and simulation of thousands of actions per rank would take tens of seconds to
    confirm. A test holds it to the full simulation; a schedule that refuses the reduced counts is
    simulated in full."""
    p, n = setup.pp, cand.n_micro

    def run(n_micro: int):
        res = simulate(build_schedule(cand.schedule, p, n_micro, virtual_stages=cand.v), cost, p2p_time=p2p_time)
        return res.makespan, res.busy, [max((e for _, e, _ in row), default=0.0) for row in res.timeline]

    if extrapolate and n > EXTRAPOLATE_ABOVE * p:
        try:
            (m1, b1, e1), (m2, b2, e2) = run(2 * p), run(3 * p)
        except ValueError:
            pass
        else:
            k = (n - 3 * p) / p
            lin = lambda a, b: b + k * (b - a)  # noqa: E731
            return lin(m1, m2), [lin(a, b) for a, b in zip(b1, b2)], [lin(a, b) for a, b in zip(e1, e2)]
    return run(n)


def _candidate(setup: Setup, schedule: str, v: int, mb: int) -> Candidate:
    n_micro = setup.global_batch // (setup.dp * mb)
    check_schedule_args(schedule, setup.pp, n_micro, v)
    order = SCHEDULES[schedule](setup.pp, n_micro, v)  # compute order only: in-flight counts and placement
    return Candidate(schedule, v, mb, n_micro, order, in_flight_counts(order))


def _check_partition(setup: Setup, layers_per_stage, S: int, empty_ends: bool) -> None:
    lps = list(layers_per_stage)
    least = min_layers(S, empty_ends)
    if len(lps) == S and sum(lps) == setup.mcfg.n_layers and empty_ends:
        check_end_only_empty(lps, "layers_per_stage")   # the trainer's rule and message
    if len(lps) != S or sum(lps) != setup.mcfg.n_layers or any(n < m for n, m in zip(lps, least)):
        ends = " (0 allowed on the first and last: an embedding-only or head-only chunk)" if empty_ends else ""
        raise ValueError(f"layers_per_stage={lps} must give each of the {S} stages at least one layer{ends} and "
                         f"sum to n_layers={setup.mcfg.n_layers}")


def evaluate_partition(setup: Setup, device: DeviceProfile, layers_per_stage: list[int], *, schedule: str,
                       micro_batch: int, virtual_stages: int = 1, items: list[Item] | None = None,
                       empty_ends: bool = True):
    """(predicted step seconds, bubble, per-rank `StageReport`s) of one given partition: what the
    planner predicts for a layout chosen by hand (the even split, say)."""
    S = setup.pp * virtual_stages
    _check_partition(setup, layers_per_stage, S, empty_ends)
    cm = CostModel(setup, device, micro_batch)
    cand = _candidate(setup, schedule, virtual_stages, micro_batch)
    return _evaluate(setup, device, items or cm.items(), cand, list(layers_per_stage), cm)


def _micro_batch_sizes(setup: Setup, given) -> list[int]:
    per_dp = setup.global_batch // setup.dp
    if given:
        bad = [b for b in given if per_dp % b]
        if bad:
            raise ValueError(f"planner.micro_batch_sizes {bad} do not divide the per-dp batch {per_dp} "
                             f"(train.global_batch_size / dp)")
        return list(given)
    return [b for b in range(1, per_dp + 1) if per_dp % b == 0]


def _mfu(setup: Setup, device: DeviceProfile, tokens_per_s: float) -> float | None:
    """The trainer's MFU (engine/trainer.py): model FLOPs per token (6N plus attention counted in full,
    `ModelConfig.flops_per_token`) over the peak of every GPU; None on the CPU, as in the trainer."""
    if device.name == "cpu":
        return None
    return tokens_per_s * setup.mcfg.flops_per_token(setup.seq_len) / (device.peak_flops * setup.world)


def _inflight_per_stage(cand: Candidate, S: int) -> list[float]:
    """Per stage, the activations in flight the partition DP charges it: a rank's activations are
    shared by its chunks, so with several chunks each sees the rank's total."""
    rank_of = stage_ranks(cand.actions, S)
    return [max(cand.peaks[rank_of[k]].values(), default=0) if cand.v == 1 else sum(cand.peaks[rank_of[k]].values())
            for k in range(S)]


def plan(setup: Setup, device: DeviceProfile, *, mem_budget_gb: float | None = None,
         schedules=("1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"), virtual_stages=(2,), micro_batch_sizes=None,
         items_for=None, empty_ends: bool = True) -> Plan:
    """The fastest feasible (schedule, virtual stages, micro-batch size, layers per stage). Every
    schedule is tried with one chunk per rank and with each of ``virtual_stages`` chunks, as far as
    its generator accepts them. ``empty_ends``: the first and last stage may hold no layer.

    ``items_for(mb)`` overrides the analytic per-item costs (profile mode). Raises `Infeasible`
    naming the smallest memory per device that would work when nothing fits."""
    budget = (mem_budget_gb if mem_budget_gb is not None else device.mem_gb) * GB
    limit = budget - device.reserve_gb * GB
    p, L = setup.pp, setup.mcfg.n_layers
    best, considered, min_needed, min_at = None, [], math.inf, None
    for mb in _micro_batch_sizes(setup, micro_batch_sizes):
        cm = CostModel(setup, device, mb)
        items = items_for(mb) if items_for else cm.items()
        bpp = cm.state_bytes_per_param()
        for sched in schedules:
            for v in dict.fromkeys((1, *virtual_stages)):
                S = p * v
                try:
                    cand = _candidate(setup, sched, v, mb)
                except ValueError as e:  # e.g. interleaving needs a multiple of pp micro-batches
                    if "virtual_stages" not in str(e):  # not just a chunk count this schedule does not take
                        considered.append((sched, v, mb, str(e)))
                    continue
                if sum(min_layers(S, empty_ends)) > L:
                    considered.append((sched, v, mb, f"pp×virtual_stages={S} exceeds {L} layers"))
                    continue
                inflight = _inflight_per_stage(cand, S)
                tied = setup.mcfg.tie_embeddings
                cuts = best_partition(items, S, in_flight=inflight, bytes_per_param=bpp, mem_limit=limit / v,
                                      tied=tied, empty_ends=empty_ends)
                if cuts is None:
                    need = v * min_memory(items, S, in_flight=inflight, bytes_per_param=bpp, tied=tied,
                                          empty_ends=empty_ends)
                    if need + device.reserve_gb * GB < min_needed:
                        min_needed, min_at = need + device.reserve_gb * GB, (sched, v, mb)
                even = even_split(L, S) if S <= L else None
                options = [c for c in (cuts, even) if c is not None]
                results = []
                for c in options:
                    step, bubble, reps = _evaluate(setup, device, items, cand, c, cm)
                    peak = max(r.peak_mem for r in reps)
                    if peak + device.reserve_gb * GB < min_needed:
                        min_needed, min_at = peak + device.reserve_gb * GB, (sched, v, mb)
                    if peak <= limit:
                        results.append((step, c, bubble, reps))
                if not results:
                    considered.append((sched, v, mb, "out of memory"))
                    continue
                even_step = next((r[0] for r in results if r[1] == even), None)
                step, c, bubble, reps = min(results, key=lambda r: (r[0], r[1] != cuts))
                considered.append((sched, v, mb, step))
                if best is None or step < best.step_time_s * (1 - 1e-9):
                    tok_s = setup.global_batch * setup.seq_len / step
                    best = Plan(sched, v, mb, cand.n_micro, c, step, bubble, reps, tok_s,
                                _mfu(setup, device, tok_s), even_step, device.name, precision=cm.precision)
    if best is None:
        need = "" if min_needed == math.inf else (
            f"; the smallest memory per device that works is {min_needed / GB:.2f} GB (schedule {min_at[0]}, "
            f"virtual_stages {min_at[1]}, micro_batch_size {min_at[2]}): raise planner.mem_budget_gb to at "
            f"least that, or turn a knob: parallel.recompute=full, parallel.sequence_parallel=true, optim.zero=1, "
            f"a larger parallel.tp or parallel.pp")
        raise Infeasible(f"no schedule, micro-batch size and partition fits {budget / GB:.2f} GB per device "
                         f"({device.reserve_gb} GB reserved){need}")
    best.considered = considered
    return best


# -- output --------------------------------------------------------------------------------------------
def format_plan(pl: Plan, setup: Setup) -> str:
    fmt_ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    rows = [("rank", "layers", "params", "peak mem GB", "fwd ms/mb", "bwd ms/mb")]
    for r in pl.stages:
        layers = ",".join(f"{a}-{b - 1}" if b > a else "none" for a, b in r.layer_ranges)
        rows.append((str(r.rank), f"{layers} ({sum(n for _, n in r.chunks)})", f"{r.params / 1e6:.1f}M",
                     f"{r.peak_mem / GB:.2f}", fmt_ms(r.fwd_s), fmt_ms(r.bwd_s)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
    even = ("n/a (does not fit)" if pl.even_step_time_s is None else
            f"{fmt_ms(pl.even_step_time_s)} ms ({pl.even_step_time_s / pl.step_time_s:.3f}x the plan)")
    mfu = "n/a" if pl.mfu is None else f"{100 * pl.mfu:.1f}%"
    return "\n".join([
        f"plan for {setup.mcfg.n_layers} layers, tp={setup.tp} pp={setup.pp} dp={setup.dp}, device {pl.device}, "
        f"global batch {setup.global_batch} × {setup.seq_len} tokens",
        f"schedule {pl.schedule}, virtual_stages {pl.virtual_stages}, micro_batch_size {pl.micro_batch_size} "
        f"({pl.n_micro} micro-batches), layers_per_stage {pl.layers_per_stage}",
        table,
        f"predicted step {fmt_ms(pl.step_time_s)} ms, bubble {100 * pl.bubble:.1f}%, "
        f"{pl.tokens_per_s:,.0f} tokens/s, MFU {mfu}; even split under the same schedule: {even}",
        "best per schedule: " + _alternatives(pl),
    ])


def _alternatives(pl: Plan) -> str:
    """The fastest micro-batch size of every schedule tried, or why none ran."""
    best: dict[tuple, tuple] = {}
    for sched, v, mb, result in pl.considered:
        key = (sched, v)
        if isinstance(result, float) and (key not in best or not isinstance(best[key][1], float)
                                          or result < best[key][1]):
            best[key] = (mb, result)
        best.setdefault(key, (mb, result))
    parts = []
    for (sched, v), (mb, result) in best.items():
        name = sched + (f"(v={v})" if v > 1 else "")
        parts.append(f"{name} {1e3 * result:.2f} ms at micro_batch_size {mb}" if isinstance(result, float)
                     else f"{name}: {result}")
    return "; ".join(parts)


def plan_yaml(pl: Plan, setup: Setup, model_name: str) -> str:
    """A Hydra config-group file (``# @package _global_``) for ``scripts/train.py +plan=<name>``."""
    body = pl.overrides()
    # the whole mesh: a launch with another world size fails early instead of running a wrong plan
    body["parallel"] = {"tp": setup.tp, "pp": setup.pp, "dp": setup.dp, **body["parallel"]}
    # the micro-batch count (and so the plan) holds for this batch shape only
    body["train"] = {"global_batch_size": setup.global_batch, "seq_len": setup.seq_len}
    # run at the compute dtype the plan was costed at (activation bytes, matmul peak)
    body["precision"] = pl.precision
    body["plan"] = {"model": model_name, "device": pl.device, "n_micro": pl.n_micro, "predicted_step_time_s": round(pl.step_time_s, 6),
                    "bubble": round(pl.bubble, 4), "tokens_per_s": round(pl.tokens_per_s, 1),
                    "peak_mem_gb": [round(r.peak_mem / GB, 3) for r in pl.stages]}
    return "# @package _global_\n# written by scripts/plan_stages.py\n" + yaml.safe_dump(body, sort_keys=False)


# -- entry point (scripts/plan_stages.py) ---------------------------------------------------------------
def setup_from_config(cfg) -> Setup:
    """The `Setup` a training launch with this `engine.config.Config` would run."""
    p = cfg.parallel
    # a search costs the device's compute dtype (and writes it into the plan); evaluate takes the config's
    precision = cfg.precision if cfg.planner.evaluate else None
    return Setup(cfg.model.build(), tp=p.tp, pp=p.pp, dp=p.dp or 1, seq_len=cfg.train.seq_len,
                 global_batch=cfg.train.global_batch_size, sequence_parallel=p.sequence_parallel,
                 recompute=p.recompute, zero=cfg.optim.zero, precision=precision, p2p_dtype=p.p2p_dtype,
                 gpus_per_node=cfg.planner.gpus_per_node)


def evaluate_from_config(cfg) -> tuple[Plan, Setup, float]:
    """``planner.evaluate=true``: the prediction for exactly the configured layout (parallel.*,
    optim.zero, precision, train.*), no search. Returns the `Plan` (its ``even_step_time_s`` unset),
    the setup and the memory limit in bytes a rank's peak must stay within."""
    pc, p = cfg.planner, cfg.parallel
    setup = setup_from_config(cfg)
    device = get_device(pc.device)
    if device.name != "cpu" and cfg.precision != "bf16" and not pc.profile:
        raise ValueError(f"planner.evaluate=true on planner.device={device.name} costs bf16 matmuls (its peak is the "
                         f"bf16 one) but precision={cfg.precision}; set precision=bf16")
    S = p.pp * p.virtual_stages
    lps = list(p.layers_per_stage) if p.layers_per_stage is not None else even_split(setup.mcfg.n_layers, S)
    per_dp = setup.global_batch // setup.dp
    if per_dp % p.micro_batch_size:
        raise ValueError(f"parallel.micro_batch_size={p.micro_batch_size} does not divide the per-dp batch {per_dp} "
                         f"(train.global_batch_size / dp)")
    items = None
    if pc.profile:
        kernels = "torch" if cfg.kernels == "auto" else cfg.kernels
        items = profile_items(setup, p.micro_batch_size, reps=pc.profile_reps, kernels=kernels,
                              threads=pc.profile_threads)
    step, bubble, reports = evaluate_partition(setup, device, lps, schedule=p.schedule,
                                               micro_batch=p.micro_batch_size, virtual_stages=p.virtual_stages,
                                               items=items)
    tok_s = setup.global_batch * setup.seq_len / step
    cm = CostModel(setup, device, p.micro_batch_size)
    pl = Plan(p.schedule, p.virtual_stages, p.micro_batch_size, per_dp // p.micro_batch_size, lps, step, bubble,
              reports, tok_s, _mfu(setup, device, tok_s), None, device.name, precision=cm.precision)
    budget = (pc.mem_budget_gb if pc.mem_budget_gb is not None else device.mem_gb) * GB
    return pl, setup, budget - device.reserve_gb * GB


def format_evaluation(pl: Plan, setup: Setup, limit: float) -> str:
    """The evaluate-mode report: the per-rank table with a memory verdict per rank, then the step."""
    device = get_device(pl.device)
    rows = [("rank", "layers", "params", "peak mem GB", "fwd ms/mb", "bwd ms/mb", "memory")]
    for r in pl.stages:
        layers = ",".join(f"{a}-{b - 1}" if b > a else "-" for a, b in r.layer_ranges)
        rows.append((str(r.rank), f"{layers} ({sum(n for _, n in r.chunks)})", f"{r.params / 1e6:.1f}M",
                     f"{r.peak_mem / GB:.2f}", f"{1e3 * r.fwd_s:.2f}", f"{1e3 * r.bwd_s:.2f}",
                     "fits" if r.peak_mem <= limit else "DOES NOT FIT"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
    mfu = "n/a" if pl.mfu is None else f"{100 * pl.mfu:.1f}%"
    tflops = pl.tokens_per_s * setup.mcfg.flops_per_token(setup.seq_len) / setup.world / 1e12
    worst = max(pl.stages, key=lambda r: r.peak_mem)
    verdict = ("fits" if worst.peak_mem <= limit else "DOES NOT FIT") + (
        f": the largest rank (rank {worst.rank}) needs {worst.peak_mem / GB:.2f} GB of the {limit / GB:.2f} GB left "
        f"after the {device.reserve_gb} GB reserve")
    return "\n".join([
        f"evaluate {setup.mcfg.n_layers} layers, tp={setup.tp} pp={setup.pp} dp={setup.dp}, device {pl.device}, "
        f"global batch {setup.global_batch} × {setup.seq_len} tokens, precision {pl.precision}, "
        f"optim.zero={setup.zero}, "
        f"recompute {setup.recompute}, sequence_parallel {str(setup.sequence_parallel).lower()}",
        f"schedule {pl.schedule}, virtual_stages {pl.virtual_stages}, micro_batch_size {pl.micro_batch_size} "
        f"({pl.n_micro} micro-batches), layers_per_stage {pl.layers_per_stage}",
        table,
        f"predicted step {1e3 * pl.step_time_s:.2f} ms, bubble {100 * pl.bubble:.1f}%, "
        f"{pl.tokens_per_s:,.0f} tokens/s, "
        f"{tflops:.1f} TFLOP/s per GPU, MFU {mfu}",
        f"memory: {verdict}",
    ])


def plan_from_config(cfg) -> tuple[Plan, Setup]:
    """The plan for a composed `engine.config.Config`; when nothing fits, the error also says which
    single memory knob (recompute, sequence parallelism, ZeRO-1) would make it fit."""
    pc = cfg.planner
    setup = setup_from_config(cfg)
    device = get_device(pc.device)

    def run(s: Setup) -> Plan:
        items_for = None
        if pc.profile:
            kernels = "torch" if cfg.kernels == "auto" else cfg.kernels
            items_for = lambda mb: profile_items(s, mb, reps=pc.profile_reps, kernels=kernels,  # noqa: E731
                                                 threads=pc.profile_threads)
        return plan(s, device, mem_budget_gb=pc.mem_budget_gb, schedules=tuple(pc.schedules),
                    virtual_stages=tuple(pc.virtual_stages), micro_batch_sizes=pc.micro_batch_sizes,
                    items_for=items_for)

    try:
        pl = run(setup)
    except Infeasible as e:
        raise Infeasible(f"{e}. {knob_advice(setup, run)}") from None
    if pc.profile:
        pl.device = f"{pc.device} memory, times profiled on this machine"
    return pl, setup


def knob_advice(setup: Setup, run) -> str:
    """Which one-key change makes an infeasible setup fit, and at what predicted step time."""
    knobs = [("parallel.recompute=selective", {"recompute": "selective"}),
             ("parallel.recompute=full", {"recompute": "full"})]
    if setup.tp > 1:
        knobs.append(("parallel.sequence_parallel=true", {"sequence_parallel": True}))
    if setup.dp > 1:
        knobs.append(("optim.zero=1", {"zero": 1}))
    fits = []
    for label, change in knobs:
        if all(getattr(setup, k) == v for k, v in change.items()):
            continue
        try:
            fits.append(f"{label} ({1e3 * run(replace(setup, **change)).step_time_s:.1f} ms/step)")
        except Infeasible:
            pass
    if fits:
        return "With this budget these fit: " + ", ".join(fits)
    return "No single memory knob (recompute, sequence parallelism, ZeRO-1) fits it: raise parallel.tp or parallel.pp"


def out_path_usage(out: str) -> tuple[str, str]:
    """(config dir, plan name) of ``<dir>/plan/<name>.yaml``; any other shape is an error."""
    path = Path(out)
    if path.suffix != ".yaml" or path.parent.name != "plan":
        raise ValueError(f"planner.out={out!r} must look like <dir>/plan/<name>.yaml (Hydra loads config group "
                         f"'plan' from <dir>), e.g. planner.out=conf/plan/my_plan.yaml")
    return str(path.parent.parent), path.stem


def write_plan(pl: Plan, setup: Setup, out: str, model_name: str) -> str:
    """Writes the override file and returns the training command that uses it."""
    config_dir, name = out_path_usage(out)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(pl, setup, model_name))
    repo_conf = Path(__file__).resolve().parents[1] / "conf"
    extra = "" if Path(config_dir).resolve() == repo_conf else f"--config-dir {config_dir} "
    return f"python scripts/train.py {extra}+plan={name} model={model_name} [your other overrides]"
