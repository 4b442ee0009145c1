"""Activation memory and forward+backward time per rank: serial vs tensor parallel vs TP + sequence parallel.

    torchrun --standalone --nproc-per-node 2 scripts/bench_tp.py [--model tiny] [--batch 4] [--seq 256] [--iters 5]

Activation memory is what autograd keeps for backward (every saved tensor that is not a parameter,
each storage counted once), measured with `torch.autograd.graph.saved_tensors_hooks` over one
forward of the whole model with its loss. The serial model runs on rank 0 alone (the others wait),
so its time is not slowed by the parallel ranks. Times are the median of ``--iters`` runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cost_model import saved_tensor_bytes  # noqa: E402
from engine.mesh import build_mesh, init_distributed  # noqa: E402
from engine.tensor_parallel import parallelize, sync_tp_grads  # noqa: E402
from models import Llama, ModelConfig, init_weights  # noqa: E402


def saved_activation_bytes(model, x, y) -> int:
    out = {}
    n = saved_tensor_bytes(model.parameters(), lambda: out.setdefault("loss", model(x, y)))
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return n


def fwd_bwd_seconds(model, x, y, mesh, iters: int) -> float:
    times = []
    for _ in range(iters + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        model(x, y).backward()
        if mesh is not None:
            sync_tp_grads([model], mesh)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def build(mcfg: ModelConfig, mesh, sequence_parallel: bool):
    with torch.device("meta"):
        model = Llama(mcfg)
    if mesh is not None:
        parallelize(model, mesh, sequence_parallel=sequence_parallel)
    return init_weights(model, seed=0, n_layers=mcfg.n_layers, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    init_distributed()
    mesh = build_mesh(tp=dist.get_world_size())
    mcfg = ModelConfig.from_name(a.model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mcfg.vocab_size, (a.batch, a.seq), generator=g)
    y = torch.randint(0, mcfg.vocab_size, (a.batch, a.seq), generator=g)
    rows = []
    if mesh.rank == 0:
        serial = build(mcfg, None, False)
        rows.append(("serial (1 rank)", saved_activation_bytes(serial, x, y), fwd_bwd_seconds(serial, x, y, None, a.iters)))
    dist.barrier()
    for label, sp in ((f"tp={mesh.tp}", False), (f"tp={mesh.tp} + sequence parallel", True)):
        model = build(mcfg, mesh, sp)
        act = torch.tensor(float(saved_activation_bytes(model, x, y)))
        dist.all_reduce(act, op=dist.ReduceOp.MAX)
        t = torch.tensor(fwd_bwd_seconds(model, x, y, mesh, a.iters))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append((label, int(act), float(t)))
    if mesh.rank == 0:
        base_act, base_t = rows[0][1], rows[0][2]
        print(f"model {a.model} ({mcfg.num_params() / 1e6:.2f}M params), batch {a.batch} × seq {a.seq}, "
              f"{mesh.tp} ranks, {torch.get_num_threads()} thread(s) per rank, gloo on CPU")
        print(f"| layout | activations per rank (MiB) | vs serial | fwd+bwd per rank (ms) | vs serial |")
        print("|---|---:|---:|---:|---:|")
        for label, act, t in rows:
            print(f"| {label} | {act / 2**20:.2f} | {act / base_act:.2f}× | {1000 * t:.1f} | {t / base_t:.2f}× |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
