"""Tandem's pipeline runtime against torch.distributed.pipelining, in one run, on a gloo world.

    python scripts/bench_pipeline.py [--pp 2] [--micro 8] [--mb 2] [--seq 128] [--dim 256] [--layers 8]
                                     [--layers-per-stage 5,3] [--steps 8] [--warmup 2]
                                     [--schedules 1f1b,interleaved_1f1b,zb_h1]

For each schedule both engines run the same model chunks (same init, same layer split), the same
micro-batches and loss, with `pp` gloo processes of one thread each. Peers:
    1f1b -> Schedule1F1B, interleaved_1f1b -> ScheduleInterleaved1F1B (v=2),
    zb_h1 -> ScheduleInterleavedZeroBubble with one stage per rank (PyTorch's ZB-H1-style schedule).
Each schedule runs in a fresh world holding both engines' copies of the model; their steps
alternate (and which goes first alternates), so machine noise hits both alike.

Two worlds per schedule, because measuring memory distorts time:
* timing: the normal allocator. A step lasts as long as its slowest rank; the median over timed
  steps gives tokens/s.
* memory: glibc is told to mmap every allocation >= 64 KiB and give it back on free, so the resident
  set follows live tensor memory and one engine's freed heap cannot hide the other's peak (this
  makes every step ~40 % slower, so no time is taken from this world). Peak memory per rank is the
  peak resident set size during a step (VmHWM, reset through /proc/self/clear_refs) minus the RSS
  just before it, median over steps: the activations, gradients and buffers a step adds on top of
  the weights.

The measured bubble of Tandem is 1 - compute time / (pp × step time) from the runner's per-action
timings; the simulated one feeds the measured mean per-action durations (per rank and kind) to
engine.pipeline.simulate; "simulated tokens/s" is that simulation's throughput with free p2p: what
Tandem's action lists give with these mean compute costs (an estimate, not a bound: real costs vary
per micro-batch and per position in the schedule).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed.pipelining as pipelining

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.mesh import build_mesh  # noqa: E402
from engine.pipeline import PipelineRunner, build_stage_chunks, build_step_actions  # noqa: E402
from engine.pipeline.actions import parse_action  # noqa: E402
from engine.pipeline.simulate import simulate  # noqa: E402
from models import ModelConfig, init_weights  # noqa: E402
from scripts._common import run_distributed  # noqa: E402

PEER = {"1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B", "zb_h1": "ScheduleInterleavedZeroBubble"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(args, pp, rank, v):

    mesh = build_mesh(pp=pp)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq)
    split = args.layers_per_stage if v == 1 else None
    chunks = build_stage_chunks(cfg, mesh, virtual_stages=v, layers_per_stage=split)
    for c in chunks:
        init_weights(c, seed=0, n_layers=cfg.n_layers, device="cpu")
    return mesh, cfg, chunks


def _make_step(engine, schedule, args, rank, world):
    """Build one engine's copy of the model chunks and return (step function, Tandem's runner or
    None, torch's stages or None)."""
    v = 2 if schedule == "interleaved_1f1b" else 1
    mesh, cfg, chunks = _build(args, world, rank, v)
    n_micro, mb, T = args.micro, args.mb, args.seq
    tokens = torch.randint(0, cfg.vocab_size, (n_micro * mb, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    first, last = mesh.is_first_stage, mesh.is_last_stage
    if engine == "tandem":

        runner = PipelineRunner(chunks, mesh, build_step_actions(schedule, world, n_micro, v),
                                hidden_shape=(mb, T, cfg.dim))

        def step():
            runner.forward_backward(x if first else None, y if last else None)
    else:

        runner = None
        stages = [pipelining.PipelineStage(c, stage_index=i * world + rank, num_stages=world * v,
                                           device=torch.device("cpu")) for i, c in enumerate(chunks)]
        head = chunks[-1]

        def loss_fn(logits, target):
            return head.loss_fn(logits, target)       # the same loss op Tandem's last stage runs

        cls = getattr(pipelining, PEER[schedule])
        sched = cls(stages[0] if cls is pipelining.Schedule1F1B else stages, n_microbatches=n_micro, loss_fn=loss_fn)

        def step():
            if first:
                sched.step(x)
            elif last:
                sched.step(target=y, losses=[])
            else:
                sched.step()

    def step_and_clear():
        step()
        for c in chunks:
            c.zero_grad(set_to_none=True)
    return step_and_clear, runner, (stages if engine == "torch" else None)


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


def _worker(rank, world, schedule, args, measure):
    """Both engines in one world, steps alternating (which goes first alternates too), so machine
    noise hits both alike. ``measure`` is "time" (step seconds and Tandem's per-action timings) or
    "memory" (each step's peak RSS above the RSS just before it)."""
    torch.manual_seed(0)
    engines = {e: _make_step(e, schedule, args, rank, world) for e in ("torch", "tandem")}
    out = {e: {"times": [], "peak_mib": [], "compute": []} for e in engines}
    order = ["torch", "tandem"]
    steps = args.steps if measure == "time" else args.memory_steps
    for i in range(args.warmup + steps):
        for engine in (order if i % 2 == 0 else order[::-1]):
            step, runner, _ = engines[engine]
            gc.collect()
            torch.distributed.barrier()
            base = _rss_kib("VmRSS")
            _reset_peak_rss()
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            peak = (_rss_kib("VmHWM") - base) / 1024
            if i >= args.warmup:
                out[engine]["times"].append(dt)
                out[engine]["peak_mib"].append(peak)
                if runner is not None:
                    out[engine]["compute"].append(_compute_summary(runner.timings))
    out["actions"] = [str(a) for a in engines["tandem"][1].actions]
    out["torch_recv_mib"] = _persistent_recv_mib(engines["torch"][2])
    return out


def _compute_summary(timings):
    """(total compute seconds, {action: seconds}) of one step."""

    per = {}
    for label, start, end in timings:
        if " " not in label and parse_action(label).is_compute:
            per[label] = end - start
    return sum(per.values()), per


def _simulate_measured(results):
    """Simulate Tandem's lists with each rank's measured mean cost per action kind: (simulated
    bubble with the measured p2p-free costs, makespan in seconds)."""

    actions, mean = [], []
    for r in results:
        actions.append([parse_action(s) for s in r["actions"]])
        by_kind: dict[str, list[float]] = {}
        for _, per in r["tandem"]["compute"]:
            for label, dt in per.items():
                by_kind.setdefault(parse_action(label).kind, []).append(dt)
        mean.append({k: statistics.mean(v) for k, v in by_kind.items()})
    sim = simulate(actions, lambda rank, a: mean[rank][a.kind])
    return sim.bubble, sim.makespan


def main() -> None:
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
    ap.add_argument("--memory-steps", type=int, default=3, help="steps per engine in the memory world")
    ap.add_argument("--layers-per-stage", type=lambda s: [int(c) for c in s.split(",")], default=None,
                    help="the same uneven split for both engines, e.g. 5,3 (schedules with one stage per rank)")
    ap.add_argument("--schedules", default="1f1b,interleaved_1f1b,zb_h1")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tokens = args.micro * args.mb * args.seq
    split = ",".join(map(str, args.layers_per_stage)) if args.layers_per_stage else "even"
    print(f"pp={args.pp} gloo processes x 1 thread; model dim={args.dim} layers={args.layers} (split {split}) "
          f"vocab={args.vocab}; {args.micro} micro-batches x {args.mb} x {args.seq} tokens per step; "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for schedule in args.schedules.split(","):
        timed = run_distributed(_worker, world_size=args.pp, args=(schedule, args, "time"), timeout=1800)
        # glibc: mmap every allocation >= 64 KiB and give it back on free (read at process start, so
        # set only around the memory world's spawn)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            mem = run_distributed(_worker, world_size=args.pp, args=(schedule, args, "memory"), timeout=1800)
        finally:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        res = {}
        for engine in ("tandem", "torch"):
            # a step lasts as long as its slowest rank
            steps = [max(r[engine]["times"][i] for r in timed) for i in range(args.steps)]
            peaks = [statistics.median(r[engine]["peak_mib"]) for r in mem]
            kept = [r["torch_recv_mib"] if engine == "torch" else 0.0 for r in mem]
            res[engine] = (tokens / statistics.median(steps), peaks, steps, kept)
        bubbles = [1 - sum(r["tandem"]["compute"][i][0] for r in timed) / (args.pp * res["tandem"][2][i])
                   for i in range(args.steps)]
        sim_bubble, sim_makespan = _simulate_measured(timed)
        rows.append((schedule, res, statistics.median(bubbles), sim_bubble, tokens / sim_makespan))
        _print_row(rows[-1])
    print()
    print("| schedule (Tandem vs torch) | Tandem tokens/s | torch tokens/s | ratio | simulated tokens/s | "
          "Tandem peak MiB per rank | torch peak MiB per rank (+ receive buffers it keeps) | "
          "Tandem bubble measured | simulated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for schedule, res, mb, sb, sim_tps in rows:
        t, p = res["tandem"], res["torch"]
        print(f"| {schedule} vs {PEER[schedule]} | {t[0]:.0f} | {p[0]:.0f} | {t[0] / p[0]:.2f}x | {sim_tps:.0f} | "
              f"{' / '.join(f'{x:.0f}' for x in t[1])} | {_peer_peaks(p)} | {mb:.1%} | {sb:.1%} |")


def _peer_peaks(p) -> str:
    return " / ".join(f"{x:.0f} (+{k:.0f})" for x, k in zip(p[1], p[3]))


def _print_row(row):
    schedule, res, mb, sb, sim_tps = row
    t, p = res["tandem"], res["torch"]
    print(f"{schedule:18s} tandem {t[0]:8.0f} tok/s  torch {p[0]:8.0f} tok/s  ratio {t[0] / p[0]:.2f}x  "
          f"simulated {sim_tps:.0f} tok/s  peak MiB tandem {[round(x) for x in t[1]]} torch {_peer_peaks(p)}  "
          f"bubble measured {mb:.1%} simulated {sb:.1%}", flush=True)


if __name__ == "__main__":
    main()
