"""Tandem's pipeline runtime against torch.distributed.pipelining, in one run, on a gloo world.

    python scripts/bench_pipeline.py [--pp 2] [--micro 8] [--mb 2] [--seq 128] [--dim 256] [--layers 8]
                                     [--layers-per-stage 5,3] [--chunk-layers 3,3,2,0] [--steps 8] [--warmup 1]
                                     [--quick]
                                     [--schedules 1f1b,interleaved_1f1b,zb_h1,zbv,dualpipev]

For each schedule both engines run the same model (same init, same layers per global stage), the
same micro-batches and loss, with `pp` gloo processes of one thread each. Peers:
    1f1b -> Schedule1F1B, interleaved_1f1b -> ScheduleInterleaved1F1B (v=2),
    zb_h1 -> ScheduleInterleavedZeroBubble with one stage per rank (PyTorch's ZB-H1-style schedule),
    zbv -> ScheduleZBVZeroBubble, dualpipev -> ScheduleDualPipeV (two stages per rank in a V: rank r
    holds stages r and 2pp-1-r; torch runs DualPipeV's overlapped F&B pairs one after the other, as its
    default OVERLAP_F_B action does when no callback is registered).
A schedule Tandem does not have (`engine.pipeline.generators.SCHEDULES`) runs torch alone, its
Tandem cells "-". One world holds every schedule's copies of the model, one per engine, and runs one
step of each in turn, the order rotating every round, so machine noise and load drift hit all of
them alike (the best-vs-best ratio compares across schedules).

Two worlds, because measuring memory distorts time:
* timing: the normal allocator. A step lasts as long as its slowest rank. Tokens/s comes from the
  fastest timed step of each (schedule, engine), the median step's in parentheses: load from other
  jobs only ever slows a step, so on a shared machine the fastest step is the closest to an
  undisturbed one (as in scripts/validate_plan.py); on a quiet machine the two agree.
* memory: glibc is told to mmap every allocation >= 64 KiB and give it back on free, so the resident
  set follows live tensor memory and one engine's freed heap cannot hide the other's peak (this
  makes every step ~40 % slower, so no time is taken from this world). Peak memory per rank is the
  peak resident set size during a step (VmHWM, reset through /proc/self/clear_refs) minus the RSS
  just before it, median over steps: the activations, gradients and buffers a step adds on top of
  the weights. Torch's stages also keep receive buffers between steps, shown as "(+N)".

Fraction of ideal (both engines, the same method): (sum over ranks of compute seconds / pp) / step
seconds, of the fastest step. Compute seconds are wall-clock spans of the compute itself,
excluding waits for received data: for Tandem the runner's per-action timings of its compute actions
(`PipelineRunner.timings`, which start when the action's input has arrived); for torch the stage's
forward_one_chunk (+ the schedule's loss call), backward_one_chunk and backward_weight_one_chunk,
each timed around the call (torch waits for its receives before calling them). 1.0 would be a step
with no bubble and no exposed communication.

"Simulated tokens/s" feeds the measured mean per-action durations of Tandem (per rank and action
kind) to engine.pipeline.simulate with free p2p: what Tandem's action lists give with these mean
compute costs (an estimate, not a bound: real costs vary per micro-batch and per position).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import Config, ModelSchema, ParallelSchema, TrainSchema  # noqa: E402
from engine.mesh import build_mesh  # noqa: E402
from engine.pipeline import build_step_actions, stage_layer_ranges  # noqa: E402
from engine.pipeline.stages import stage_model  # noqa: E402
from engine.pipeline.actions import parse_action  # noqa: E402
from engine.pipeline.generators import SCHEDULES  # noqa: E402
from engine.pipeline.simulate import simulate  # noqa: E402
from engine.trainer import build_chunks, build_executor  # noqa: E402
from models import ModelConfig, init_weights  # noqa: E402
from scripts._common import run_distributed  # noqa: E402

# schedule -> (torch's class, chunks per rank, torch's stage placement)
PEER = {"1f1b": ("Schedule1F1B", 1, "loop"),
        "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
        "zb_h1": ("ScheduleInterleavedZeroBubble", 1, "loop"),
        "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
        "dualpipev": ("ScheduleDualPipeV", 2, "v")}
SEED = 0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _model_config(args) -> ModelConfig:
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                       ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq)


def _split_for(args, v):
    return args.layers_per_stage if v == 1 else args.chunk_layers


def _tandem(schedule, args, mesh, mcfg):
    """Tandem's chunks and runner, built as the trainer builds them (build_step_actions, then
    build_chunks / build_executor from one Config), so the stage placement is the schedule's own."""
    v = PEER[schedule][1]
    n_micro = args.micro
    model = ModelSchema(name="tiny", dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.kv_heads, ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq)
    split = _split_for(args, v)
    cfg = Config(model=model, train=TrainSchema(seq_len=args.seq, global_batch_size=n_micro * args.mb, seed=SEED),
                 parallel=ParallelSchema(pp=mesh.pp, micro_batch_size=args.mb, schedule=schedule, virtual_stages=v,
                                         layers_per_stage=list(split) if split else None),
                 kernels="torch")
    step_actions = build_step_actions(schedule, mesh.pp, n_micro, v)
    # the mesh carries the schedule's stage placement (the V for zbv / dualpipev), as the trainer's does
    mesh = dataclasses.replace(mesh, pp_placement=step_actions.placement)
    chunks = build_chunks(cfg, mcfg, mesh)
    runner = build_executor(cfg, mcfg, mesh, chunks, n_micro, step_actions)
    held = {a.stage for a in step_actions.train[mesh.pp_rank] if a.is_compute}
    return chunks, runner, 0 in held, mesh.pp * v - 1 in held


def _torch_chunks(schedule, args, mesh, mcfg):
    """Torch's stages: the same layer ranges per global stage as Tandem's, placed by torch's own
    stage-to-rank mapping for the schedule."""
    _, v, style = PEER[schedule]
    ranges = stage_layer_ranges(mcfg.n_layers, mesh.pp, v, _split_for(args, v))
    indices = generate_rank_to_stage_mapping(mesh.pp, mesh.pp * v, style=style)[mesh.pp_rank]
    with torch.device("meta"):
        chunks = [stage_model(mcfg, ranges, s, "torch") for s in indices]   # first/last by stage index
    for c in chunks:
        init_weights(c, seed=SEED, n_layers=mcfg.n_layers, device="cpu")
    return chunks, indices


class _ComputeClock:
    """Adds up the wall-clock seconds spent inside the wrapped calls (torch's stage compute)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, obj, name):
        inner = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(obj, name, timed)


def _make_step(engine, schedule, args, mesh):
    """One engine's copy of the model and its step function. Returns (step, compute seconds of the
    last step as a callable, Tandem's runner or None, torch's stages or None)."""
    mcfg = _model_config(args)
    n_micro, T = args.micro, args.seq
    tokens = torch.randint(0, mcfg.vocab_size, (n_micro * args.mb, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if engine == "tandem":
        chunks, runner, first, last = _tandem(schedule, args, mesh, mcfg)

        def step():
            loss = runner.forward_backward(x if first else None, y if last else None)
            return None if loss is None else float(loss)
        compute, stages = (lambda: _compute_summary(runner)[0]), None
    else:
        runner = None
        chunks, indices = _torch_chunks(schedule, args, mesh, mcfg)
        n_stages = mesh.pp * PEER[schedule][1]
        stages = [pipelining.PipelineStage(c, stage_index=s, num_stages=n_stages, device=torch.device("cpu"))
                  for c, s in zip(chunks, indices)]
        head = next(c for c, s in zip(chunks, indices) if s == n_stages - 1) if n_stages - 1 in indices else None

        def loss_fn(logits, target):
            return head.loss_fn(logits, target)       # the same loss op Tandem's last stage runs

        cls = getattr(pipelining, PEER[schedule][0])
        sched = cls(stages[0] if cls is pipelining.Schedule1F1B else stages, n_microbatches=n_micro, loss_fn=loss_fn)
        clock = _ComputeClock()
        for stage in stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                clock.wrap(stage, name)
        clock.wrap(sched, "_maybe_compute_loss")
        first, last = 0 in indices, n_stages - 1 in indices

        def step():
            clock.seconds = 0.0
            losses = []
            # return_outputs=False: the peer need not keep every micro-batch's logits for a merged output
            sched.step(*([x] if first else []), **({"target": y, "losses": losses} if last else {}),
                       return_outputs=False)
            return float(torch.stack(losses).detach().mean()) if losses else None
        compute = lambda: clock.seconds  # noqa: E731

    def step_and_clear():
        loss = step()     # the mean loss on the rank holding the last stage, else None
        for c in chunks:
            c.zero_grad(set_to_none=True)
        return loss
    return step_and_clear, compute, runner, stages


def _persistent_recv_mib(stages) -> float:
    """The receive buffers torch's stages allocate once (one per micro-batch and direction) and keep
    between steps: already resident before a step, so the per-step peak does not show them."""
    total = 0
    for stage in stages:
        for table in (stage.args_recv_info, stage.grad_recv_info):
            for infos in table.values():
                for info in (infos if isinstance(infos, (tuple, list)) else [infos]):
                    buf = getattr(info, "buffer", None)
                    if isinstance(buf, torch.Tensor):
                        total += buf.numel() * buf.element_size()
    return total / 2**20


def _worker(rank, world, schedules, args, measure):
    """Every schedule's engines (torch alone for a schedule Tandem lacks) in one world, one step of
    each in turn, the order rotating every round, so machine noise and load drift hit all of them
    alike (also across schedules, which the best-vs-best ratio compares). ``measure`` is "time" (step
    and compute seconds, Tandem's per-action timings) or "memory" (each step's peak RSS above the RSS
    just before it)."""
    torch.manual_seed(0)
    mesh = build_mesh(pp=world)
    pairs = [(s, e) for s in schedules for e in (("torch", "tandem") if s in SCHEDULES else ("torch",))]
    engines = {pair: _make_step(pair[1], pair[0], args, mesh) for pair in pairs}
    out = {s: {} for s in schedules}
    for s, e in pairs:
        out[s][e] = {"times": [], "peak_mib": [], "compute": [], "actions": [], "loss": None}
    steps = args.steps if measure == "time" else args.memory_steps
    for i in range(args.warmup + steps):
        k = i % len(pairs)
        for pair in pairs[k:] + pairs[:k]:
            step, compute, runner, _ = engines[pair]
            gc.collect()
            torch.distributed.barrier()
            base = _rss_kib("VmRSS")
            _reset_peak_rss()
            t0 = time.perf_counter()
            loss = step()
            dt = time.perf_counter() - t0
            peak = (_rss_kib("VmHWM") - base) / 1024
            rec = out[pair[0]][pair[1]]
            if i == 0:
                rec["loss"] = loss    # no optimizer step: every step's loss is the first one's
            if i >= args.warmup:
                rec["times"].append(dt)
                rec["peak_mib"].append(peak)
                rec["compute"].append(compute())
                if runner is not None:
                    rec["actions"].append(_compute_summary(runner)[1])
    for s in schedules:
        if (s, "tandem") in engines:
            out[s]["tandem_actions"] = list(engines[(s, "tandem")][2].actions)
        out[s]["torch_recv_mib"] = _persistent_recv_mib(engines[(s, "torch")][3])
    return out


def _compute_summary(runner):
    """(total compute seconds, {action: seconds}) of the runner's last step: its timings minus the
    p2p batches (labels of send/receive actions; a compute action's span excludes its input wait)."""
    by_label = {str(a): a for a in runner.actions}
    per = {}
    for label, start, end in runner.timings:
        a = by_label.get(label)
        if a is not None and a.is_compute:
            per[a] = end - start
    return sum(per.values()), per


def _simulate_measured(results):
    """Tandem's lists simulated with each rank's measured mean cost per action kind and free p2p:
    the makespan in seconds."""
    mean = []
    for r in results:
        by_kind: dict[str, list[float]] = {}
        for per in r["tandem"]["actions"]:
            for a, dt in per.items():
                by_kind.setdefault(a.kind, []).append(dt)
        mean.append({k: statistics.mean(v) for k, v in by_kind.items()})
    return simulate([r["tandem_actions"] for r in results], lambda rank, a: mean[rank][a.kind]).makespan


def _summarize(timed, mem, args, tokens):
    """Per engine: tokens/s, fraction of ideal, peak MiB per rank, kept receive MiB per rank."""
    res = {}
    for engine in timed[0]:
        if engine not in ("torch", "tandem"):
            continue
        # a step lasts as long as its slowest rank
        steps = [max(r[engine]["times"][i] for r in timed) for i in range(args.steps)]
        ideal = [sum(r[engine]["compute"][i] for r in timed) / args.pp / steps[i] for i in range(args.steps)]
        fastest = min(range(args.steps), key=steps.__getitem__)
        res[engine] = {"tps": tokens / steps[fastest], "median_tps": tokens / statistics.median(steps),
                       "ideal": ideal[fastest],
                       "peak": [statistics.median(r[engine]["peak_mib"]) for r in mem],
                       "kept": [r["torch_recv_mib"] if engine == "torch" else 0.0 for r in mem]}
    if "tandem" in res:
        res["tandem"]["sim_tps"] = tokens / _simulate_measured(timed)
    return res


def _total_peak(e) -> float:
    """The largest rank's peak, counting what torch keeps between steps."""
    return max(p + k for p, k in zip(e["peak"], e["kept"]))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--mb", type=int, default=2, help="micro-batch size")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per engine")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps per engine in the memory world")
    ap.add_argument("--layers-per-stage", type=lambda s: [int(c) for c in s.split(",")], default=None,
                    help="the same uneven split for both engines, e.g. 5,3 (schedules with one stage per rank)")
    ap.add_argument("--chunk-layers", type=lambda s: [int(c) for c in s.split(",")], default=None,
                    help="the same split for the two-chunk schedules (interleaved, zbv, dualpipev): pp×2 counts "
                         "by global stage, 0 allowed on the first and last (e.g. 3,3,2,0: a head-only last chunk)")
    ap.add_argument("--schedules", default=",".join(PEER))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: a toy model, 2 timed steps, 1 memory step (numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.dim, args.heads, args.kv_heads, args.ffn, args.vocab, args.seq = 32, 2, 1, 64, 64, 8
        args.steps, args.memory_steps, args.warmup = 2, 1, 1
    unknown = [s for s in args.schedules.split(",") if s not in PEER]
    if unknown:
        ap.error(f"--schedules: no torch peer for {', '.join(unknown)}; choose from {', '.join(PEER)}")
    return args


def first_losses(results) -> dict[tuple[str, str], float]:
    """{(schedule, engine): the step's mean loss} from a world's results, read on the rank that holds
    the last stage. Every schedule of both engines runs the same model on the same tokens, so these
    must all agree: the check that the table compares like with like."""
    out = {}
    for r in results:
        for schedule, engines in r.items():
            for engine in ("torch", "tandem"):
                if engines.get(engine, {}).get("loss") is not None:
                    out[(schedule, engine)] = engines[engine]["loss"]
    return out


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tokens = args.micro * args.mb * args.seq
    split = ",".join(map(str, args.layers_per_stage)) if args.layers_per_stage else "even"
    if args.chunk_layers:
        split += "; two-chunk schedules " + ",".join(map(str, args.chunk_layers))
    print(f"pp={args.pp} gloo processes x 1 thread; model dim={args.dim} layers={args.layers} (split {split}) "
          f"vocab={args.vocab}; {args.micro} micro-batches x {args.mb} x {args.seq} tokens per step; "
          f"torch {torch.__version__}", flush=True)
    schedules = args.schedules.split(",")
    timed = run_distributed(_worker, world_size=args.pp, args=(schedules, args, "time"), timeout=3600)
    # glibc: mmap every allocation >= 64 KiB and give it back on free (read at process start, so set
    # only around the memory world's spawn)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        mem = run_distributed(_worker, world_size=args.pp, args=(schedules, args, "memory"), timeout=3600)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    losses = first_losses(timed)
    print(f"same model everywhere: the first step's loss is {min(losses.values()):.6f}..{max(losses.values()):.6f} "
          f"over {len(losses)} (schedule, engine) runs", flush=True)
    rows = []
    for schedule in schedules:
        rows.append((schedule, _summarize([r[schedule] for r in timed], [r[schedule] for r in mem], args, tokens)))
        _print_row(*rows[-1])
    _print_table(rows)
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end)")


def _mib(e) -> str:
    # a step that adds less than the allocator's noise can read a hair below zero: shown as 0
    return " / ".join(f"{max(p, 0.0):.0f}" + (f" (+{k:.0f})" if k else "") for p, k in zip(e["peak"], e["kept"]))


def _print_row(schedule, res):
    p, t = res["torch"], res.get("tandem")
    tandem = f"tandem {_tps(t)} tok/s ({t['ideal']:.1%} of ideal)" if t else "tandem -"
    ratio = f"ratio {t['tps'] / p['tps']:.2f}x" if t else "ratio -"
    print(f"{schedule:18s} {tandem}  torch {_tps(p)} tok/s ({p['ideal']:.1%} of ideal)  {ratio}  "
          f"peak MiB tandem [{_mib(t) if t else '-'}] torch [{_mib(p)}]", flush=True)


def _tps(e) -> str:
    return f"{e['tps']:.0f} ({e['median_tps']:.0f})"


def _print_table(rows):
    print()
    print("| schedule | torch peer | Tandem tokens/s (median) | torch tokens/s (median) | ratio | Tandem of ideal | torch of ideal | "
          "Tandem simulated tokens/s | Tandem peak MiB per rank | torch peak MiB per rank (+ receive buffers it keeps) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for schedule, res in rows:
        p, t = res["torch"], res.get("tandem")
        cells = ([_tps(t), _tps(p), f"{t['tps'] / p['tps']:.2f}x", f"{t['ideal']:.1%}",
                  f"{p['ideal']:.1%}", f"{t['sim_tps']:.0f}", _mib(t), _mib(p)] if t else
                 ["-", _tps(p), "-", "-", f"{p['ideal']:.1%}", "-", "-", _mib(p)])
        print(f"| {schedule} | {PEER[schedule][0]} | " + " | ".join(cells) + " |")
    best_p = max(rows, key=lambda r: r[1]["torch"]["tps"])
    ours = [r for r in rows if "tandem" in r[1]]
    if not ours:
        return
    best_t = max(ours, key=lambda r: r[1]["tandem"]["tps"])
    t, p = best_t[1]["tandem"], best_p[1]["torch"]
    ratio, mt, mp = t["tps"] / p["tps"], _total_peak(t), _total_peak(p)
    print(f"\nbest: Tandem {best_t[0]} {t['tps']:.0f} tok/s ({t['ideal']:.1%} of ideal, largest rank peak "
          f"{mt:.0f} MiB) vs torch {best_p[0]} {p['tps']:.0f} tok/s ({p['ideal']:.1%} of ideal, largest rank peak "
          f"{mp:.0f} MiB incl. kept buffers): {ratio:.2f}x")
    print(f"goal (>= 1.15x at equal or lower peak memory, >= 90% of ideal): speed {'met' if ratio >= 1.15 else 'NOT met'}"
          f", memory {'met' if mt <= mp else 'NOT met'}, ideal {'met' if t['ideal'] >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    main()
