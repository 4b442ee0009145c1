"""Planner prediction vs measurement on this CPU: a pp=2 (or --pp 4) gloo run of an unbalanced model.

    python scripts/validate_plan.py [--pp 2 --layers 8 --dim 256 --vocab 8192 --seq 128 --batch 16 --micro 4 --steps 8]

1. ``planner.profile=true`` in-process: times the real embedding, layer and head (one thread, as each
   gloo rank runs) and plans pp stages under 1F1B with that micro-batch size.
2. Runs the planned partition and the even split for real: pp spawned gloo processes, the trainer's
   own chunk and PipelineRunner construction, random tokens, ``--steps`` measured steps after warm-up.
3. Prints, per stage, the predicted vs measured forward+backward time per micro-batch (from the
   runner's per-action timings) with the error, and predicted vs measured step times of both layouts.
   Steps of the two layouts alternate and each keeps its fastest step, so load from other processes
   on a shared machine biases neither.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine import planner as P  # noqa: E402
from engine.config import Config, ModelSchema, ParallelSchema, TrainSchema  # noqa: E402
from engine.layout import even_split  # noqa: E402
from engine.mesh import build_mesh  # noqa: E402
from engine.pipeline import build_step_actions  # noqa: E402
from engine.pipeline.actions import parse_action  # noqa: E402
from engine.pipeline.generators import build_schedule  # noqa: E402
from engine.pipeline.simulate import simulate  # noqa: E402
from engine.trainer import build_chunks, build_executor  # noqa: E402
from models.config import ModelConfig  # noqa: E402


def _config(a, layers_per_stage) -> Config:
    model = ModelSchema(name="tiny", dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                        ffn_dim=a.ffn, vocab_size=a.vocab, max_seq_len=a.seq)
    return Config(model=model, train=TrainSchema(seq_len=a.seq, global_batch_size=a.batch),
                  parallel=ParallelSchema(pp=a.pp, micro_batch_size=a.micro, schedule="1f1b",
                                          layers_per_stage=list(layers_per_stage)), kernels="torch")


def _count_cpu_time(runner) -> None:
    """Adds up this thread's CPU time per compute kind around the runner's compute actions: with one
    thread per rank that is the compute time without the periods other processes held the core
    (the wall-clock ``runner.timings`` include them)."""
    runner.cpu_time, runner.action_cpu = {}, {}  # per step by kind; fastest per action over steps
    for kind in ("F", "B", "I", "W"):
        inner = getattr(runner, f"_run_{kind}")

        def timed(a, _inner=inner, _kind=kind):
            t0 = time.thread_time()
            _inner(a)
            dt = time.thread_time() - t0
            runner.cpu_time[_kind] = runner.cpu_time.get(_kind, 0.0) + dt
            runner.action_cpu[str(a)] = min(runner.action_cpu.get(str(a), dt), dt)

        setattr(runner, f"_run_{kind}", timed)


def _worker(rank, port, a, layouts, queue):
    """Builds one runner per layout in the same two processes and alternates their steps, so that
    load from elsewhere on the machine hits both layouts alike; keeps each layout's fastest times."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(a.pp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a.pp)
    try:
        mesh = build_mesh(tp=1, pp=a.pp, dp=1)
        n_micro = a.batch // a.micro
        runs = []
        for lps in layouts:
            cfg = _config(a, lps)
            mcfg = cfg.model.build()
            chunks = build_chunks(cfg, mcfg, mesh)
            actions = build_step_actions(cfg.parallel.schedule, mesh.pp, n_micro, cfg.parallel.virtual_stages)
            runner = build_executor(cfg, mcfg, mesh, chunks, n_micro, actions)
            _count_cpu_time(runner)
            runs.append((chunks, runner))
        x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
        results = [{"step": [], "fwd": [], "bwd": [], "cpu": []} for _ in layouts]
        for step in range(a.warmup + a.steps):
            for (chunks, runner), res in zip(runs, results):
                dist.barrier()
                t0 = time.perf_counter()
                runner.forward_backward(x if mesh.is_first_stage else None, x if mesh.is_last_stage else None)
                dt = time.perf_counter() - t0
                for c in chunks:
                    c.zero_grad(set_to_none=True)
                if step < a.warmup:
                    continue
                res["step"].append(dt)
                per = {"F": 0.0, "B": 0.0}
                for label, start, end in runner.timings:  # compute actions are labelled like "0F3"
                    act = None if " " in label else parse_action(label)  # not `a`: that is the arguments
                    if act is not None and act.is_compute:
                        per["F" if act.kind == "F" else "B"] += end - start
                res["fwd"].append(per["F"] / n_micro)
                res["bwd"].append(per["B"] / n_micro)
                res["cpu"].append(sum(runner.cpu_time.values()) / n_micro)
                runner.cpu_time.clear()
        for (_, runner), res in zip(runs, results):
            res["action_cpu"] = runner.action_cpu
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def measure(a, layouts) -> list[list[dict]]:
    """[layout][rank] -> {"step": [s...], "fwd": [s per micro-batch...], "bwd": [...], ...}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, a, layouts, queue)) for r in range(a.pp)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    return [[out[r][i] for r in range(a.pp)] for i in range(len(layouts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("pp", 2), ("layers", 8), ("dim", 256), ("heads", 8), ("kv_heads", 2), ("ffn", 512),
                          ("vocab", 8192), ("seq", 128), ("batch", 16), ("micro", 4), ("steps", 8), ("warmup", 2),
                          ("reps", 7)):
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    a = ap.parse_args()
    mcfg = ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn,
                       vocab_size=a.vocab, max_seq_len=a.seq)
    setup = P.Setup(mcfg, pp=a.pp, seq_len=a.seq, global_batch=a.batch)
    cpu = P.get_device("cpu")
    items = P.profile_items(setup, a.micro, reps=a.reps, threads=1)
    pl = P.plan(setup, cpu, schedules=("1f1b",), micro_batch_sizes=[a.micro], items_for=lambda mb: items)
    even = even_split(a.layers, a.pp)
    print(P.format_plan(pl, setup))
    layouts = [("planned", pl.layers_per_stage), ("even", even)]
    measured = measure(a, [lps for _, lps in layouts])
    rows = []
    for (name, lps), meas in zip(layouts, measured):
        pred_step, _, reports = P.evaluate_partition(setup, cpu, lps, schedule="1f1b", micro_batch=a.micro,
                                                     items=items)
        # the measured loop runs forward_backward only: leave out the optimizer step the plan includes
        pred_step -= P.CostModel(setup, cpu, a.micro).optimizer_time(max(r.params for r in reports))
        meas_step = min(max(s) for s in zip(*(m["step"] for m in meas)))
        replay = replay_step(a, meas)
        meas = [{"wall": min(f + b for f, b in zip(m["fwd"], m["bwd"])), "cpu": min(m["cpu"])} for m in meas]
        rows.append((name, lps, pred_step, meas_step, reports, meas, replay))
    print(f"\nprediction vs measurement (pp={a.pp}, 1f1b, gloo, 1 thread per rank, fastest of {a.steps} steps); "
          f"F+B per micro-batch in ms, measured as CPU time and as wall time (runner.timings)")
    print(f"{'layout':>8} {'stage':>5} {'layers':>6} {'predicted':>9} {'meas cpu':>9} {'error':>7} "
          f"{'meas wall':>9} {'error':>7}")
    err = lambda p, m: f"{100 * (p - m) / m:+.1f}%"  # noqa: E731
    for name, lps, _, _, reports, meas, _ in rows:
        for r, (rep, m) in enumerate(zip(reports, meas)):
            pred = 1e3 * (rep.fwd_s + rep.bwd_s)
            cpu, wall = 1e3 * m["cpu"], 1e3 * m["wall"]
            print(f"{name:>8} {r:>5} {lps[r]:>6} {pred:>9.2f} {cpu:>9.2f} {err(pred, cpu):>7} "
                  f"{wall:>9.2f} {err(pred, wall):>7}")
        pred_b = max(1e3 * (rep.fwd_s + rep.bwd_s) for rep in reports)
        cpu_b, wall_b = (max(1e3 * m[k] for m in meas) for k in ("cpu", "wall"))
        print(f"{name:>8} bottleneck stage: predicted {pred_b:.2f} ms; measured {cpu_b:.2f} ms cpu "
              f"({err(pred_b, cpu_b)}), {wall_b:.2f} ms wall ({err(pred_b, wall_b)})")
    print(f"\nstep time (ms): predicted; measured wall clock (fastest step); the schedule replayed with the "
          f"measured per-action CPU times")
    print(f"{'layout':>8} {'layers':>10} {'predicted':>10} {'wall':>10} {'replayed':>10}")
    for name, lps, pred_step, meas_step, _, _, replay in rows:
        print(f"{name:>8} {str(lps):>10} {1e3 * pred_step:>10.1f} {1e3 * meas_step:>10.1f} {1e3 * replay:>10.1f}")
    (_, _, pp_, pm, _, _, pr), (_, _, ep, em, _, _, er) = rows
    print(f"\neven / planned step time: predicted {ep / pp_:.3f}x, measured wall {em / pm:.3f}x, "
          f"replayed {er / pr:.3f}x")
    print(f"(load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall clock is "
          f"only meaningful when it is below the core count)")


def replay_step(a, meas) -> float:
    """The 1F1B schedule's makespan with every compute action costing its measured CPU time (the
    fastest over the steps) and free p2p: the step a quiet machine would take, from real timings."""
    costs = {k: v for m in meas for k, v in m["action_cpu"].items()}
    return simulate(build_schedule("1f1b", a.pp, a.batch // a.micro), lambda r, x: costs.get(str(x), 0.0)).makespan


if __name__ == "__main__":
    main()
