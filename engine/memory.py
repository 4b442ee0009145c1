"""The persistent bytes each rank holds for its model and optimizer, from the layout alone (as
Megatron's theoretical memory report): parameters, gradients, fp32 master weights, AdamW moments
(with their per-tensor step counters), and module buffers. Activations and transient buffers are not
counted. The numbers follow the rules the engine builds by, not the tensors it built:
tests/parallel/test_zero2.py holds them against the bytes of the tensors that really exist.

- parameters: every local parameter; under zero=2 the padded parameter buckets they are views of.
- gradients: dp > 1: the reducer's persistent buckets (padded to a multiple of dp under zero=2);
  dp = 1: the gradients autograd allocates every step (held from backward to the update).
- master weights: zero=2 with bf16 parameters: this rank's fp32 slice of every bucket; else 0
  (fp32 parameters are their own master copy).
- moments: exp_avg and exp_avg_sq in the parameter's dtype (zero=2: fp32, for the owned pieces only;
  zero=1: for the owned parameters only) plus a 4-byte step counter per optimized tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.buckets import size_buckets
from engine.data_parallel import BUCKET_BYTES
from engine.mesh import Mesh
from engine.optim import Optimizer, ParamRef

FIELDS = ("parameters", "gradients", "master_weights", "moments", "buffers")
STEP_BYTES = 4   # AdamW's step counter: a float32 scalar per optimized tensor


def _nbytes(p: nn.Parameter) -> int:
    return p.numel() * p.element_size()


def persistent_bytes(refs: list[ParamRef], chunks: list[nn.Module], mesh: Mesh, *, zero: int, late=(),
                     bucket_bytes: int = BUCKET_BYTES) -> dict[str, int]:
    """This rank's persistent bytes by kind (`FIELDS`) and their ``total``. ``late``: the parameters
    ZeRO-2 reduce-scatters after the tp / tied sums (their own buckets, `engine.zero.late_params`)."""
    params = [r.param for r in refs]
    dp = mesh.dp
    zero = zero if dp > 1 else 0
    late_ids = {id(p) for p in late}
    out = dict.fromkeys(FIELDS, 0)
    out["buffers"] = sum(b.numel() * b.element_size() for c in chunks for b in c.buffers())
    if zero == 2:
        buckets = size_buckets(reversed(params), key=lambda p: (p.dtype, p.device, id(p) in late_ids),
                               nbytes=_nbytes, bucket_bytes=bucket_bytes)
        for _, ps in buckets:
            padded = -(-sum(p.numel() for p in ps) // dp) * dp
            es = ps[0].element_size()
            out["parameters"] += padded * es
            out["gradients"] += padded * es
            lo, hi = mesh.dp_rank * padded // dp, (mesh.dp_rank + 1) * padded // dp
            if ps[0].dtype != torch.float32:
                out["master_weights"] += (hi - lo) * 4
            at = 0
            for p in ps:   # the pieces of the owned slice: fp32 moments and a step counter each
                n = min(hi, at + p.numel()) - max(lo, at)
                if n > 0:
                    out["moments"] += 2 * n * 4 + STEP_BYTES
                at += p.numel()
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


def launch_report(refs, chunks, mesh: Mesh, *, zero: int, late=()) -> tuple[dict[str, int], str | None]:
    """Collective: this rank's numbers, and on rank 0 the report of every rank (None elsewhere)."""
    mine = persistent_bytes(refs, chunks, mesh, zero=zero, late=late)
    where = f"rank {mesh.rank} (pp {mesh.pp_rank} tp {mesh.tp_rank} dp {mesh.dp_rank})"
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, where))
    if mesh.rank != 0:
        return mine, None
    return mine, format_report([g[0] for g in gathered], [g[1] for g in gathered], zero=zero, dp=mesh.dp)
