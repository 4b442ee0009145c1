"""The persistent bytes each rank holds for its model and optimizer, from the layout alone (as
Megatron's theoretical memory report): parameters, gradients, fp32 master weights, AdamW moments
(with their per-tensor step counters), and module buffers. Activations and transient buffers are not
counted. The numbers follow the rules the engine builds by, not the tensors it built:
tests/parallel/test_zero2.py holds them against the bytes of the tensors that really exist.

- parameters: every local parameter; under zero=2 the padded parameter buckets they are views of.
- gradients: dp > 1: the reducer's persistent buckets (padded to a multiple of dp under zero=2),
  and under zero=2 with bf16 parameters the persistent fp32 copy of this rank's slice of each that
  the norm, the clip and AdamW read; dp = 1: the gradients autograd allocates every step (held from
  backward to the update).
- master weights: zero=2 with bf16 parameters: this rank's fp32 slice of every bucket; else 0
  (fp32 parameters are their own master copy).
- moments: exp_avg and exp_avg_sq in the parameter's dtype (zero=2: fp32, for the owned pieces only;
  zero=1: for the owned parameters only) plus a 4-byte step counter per optimized tensor.

The numbers are logical bytes (elements × element size), not what an allocator reports: CUDA's
caching allocator rounds every tensor up to 512 B (`torch.cuda.memory_allocated` is larger by up to
that per tensor), and CPU foreach AdamW keeps its step counters on the host.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.data_parallel import BUCKET_BYTES
from engine.mesh import Mesh
from engine.optim import Optimizer, ParamRef
from engine.zero import slice_pieces, zero_bucket_key, zero_buckets

FIELDS = ("parameters", "gradients", "master_weights", "moments", "buffers")
STEP_BYTES = 4   # AdamW's step counter: a float32 scalar per optimized tensor


def _nbytes(p: nn.Parameter) -> int:
    return p.numel() * p.element_size()


def persistent_bytes(refs: list[ParamRef], chunks: list[nn.Module], mesh: Mesh, *, zero: int, bucket_key=None,
                     bucket_bytes: int = BUCKET_BYTES) -> dict[str, int]:
    """This rank's persistent bytes by kind (`FIELDS`) and their ``total``. ``bucket_key``: ZeRO-2's
    bucket key (`engine.zero.zero_bucket_key`; by default none late, none alone)."""
    params = [r.param for r in refs]
    dp = mesh.dp
    zero = zero if dp > 1 else 0
    out = dict.fromkeys(FIELDS, 0)
    out["buffers"] = sum(b.numel() * b.element_size() for c in chunks for b in c.buffers())
    if zero == 2:
        for ps, padded in zero_buckets(params, bucket_key or zero_bucket_key(), dp, bucket_bytes):
            es = ps[0].element_size()
            out["parameters"] += padded * es
            out["gradients"] += padded * es
            if ps[0].dtype != torch.float32:   # the fp32 master slice and the fp32 gradient slice
                out["master_weights"] += padded // dp * 4
                out["gradients"] += padded // dp * 4
            for _, start, stop, _ in slice_pieces([p.numel() for p in ps], padded, dp, mesh.dp_rank):
                out["moments"] += 2 * (stop - start) * 4 + STEP_BYTES   # fp32 moments and a step counter each
    else:
        out["parameters"] = out["gradients"] = sum(_nbytes(p) for p in params)
        owners = Optimizer._partition(refs, dp) if zero == 1 else [mesh.dp_rank] * len(refs)
        out["moments"] = sum(2 * _nbytes(r.param) + STEP_BYTES for r, o in zip(refs, owners) if o == mesh.dp_rank)
    out["total"] = sum(out[k] for k in FIELDS)
    return out


def format_report(per_rank: list[dict[str, int]], coords: list[str], *, zero: int, dp: int) -> str:
    """Rank 0's launch report: one line per distinct set of numbers, naming the ranks that hold it."""
    groups: dict[tuple, list[str]] = {}
    for numbers, where in zip(per_rank, coords):
        groups.setdefault(tuple(numbers[k] for k in (*FIELDS, "total")), []).append(where)
    mode = f"optim.zero={zero}" + (" (dp=1: runs as zero=0)" if zero and dp == 1 else "")
    lines = [f"persistent memory per rank, {mode}, in bytes:"]
    for numbers, ranks in groups.items():
        fields = " ".join(f"{k}={v}" for k, v in zip((*FIELDS, "total"), numbers))
        lines.append(f"  {', '.join(ranks)}: {fields} ({numbers[-1] / 2**20:.2f} MiB)")
    return "\n".join(lines)


def launch_report(refs, chunks, mesh: Mesh, *, zero: int, bucket_key=None) -> tuple[dict[str, int], str | None]:
    """Collective: this rank's numbers, and on rank 0 the report of every rank (None elsewhere)."""
    mine = persistent_bytes(refs, chunks, mesh, zero=zero, bucket_key=bucket_key)
    where = f"rank {mesh.rank} (pp {mesh.pp_rank} tp {mesh.tp_rank} dp {mesh.dp_rank})"
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, where))
    if mesh.rank != 0:
        return mine, None
    return mine, format_report([g[0] for g in gathered], [g[1] for g in gathered], zero=zero, dp=mesh.dp)
