"""Layout-independent initialization.

A parameter's initial value is a function of ``(seed, global name)`` only. Values are drawn
in blocks of rows of the *global* tensor, each block from its own generator, so a shard can be
filled with exactly the values the serial model holds in that slice without ever building the
whole tensor (only the row blocks it touches). Where a shard sits in its global tensor comes from `models.shard`.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from models.shard import ShardMeta, iter_params

ROW_BLOCK = 256  # rows of the global tensor drawn from one generator


def _generator(seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def normal_slice(seed: int, name: str, meta: ShardMeta, std: float) -> torch.Tensor:
    """The values N(0, std²) of the global tensor ``name`` in the region ``meta`` describes (fp32, CPU)."""
    rows = meta.global_shape[0]
    r0, r1 = meta.offset[0], meta.offset[0] + meta.shape[0]
    rest = meta.global_shape[1:]
    pieces = []
    for block in range(r0 // ROW_BLOCK, (r1 + ROW_BLOCK - 1) // ROW_BLOCK):
        b0, b1 = block * ROW_BLOCK, min((block + 1) * ROW_BLOCK, rows)
        vals = torch.randn((b1 - b0, *rest), generator=_generator(seed, name, block)) * std
        pieces.append(vals[max(r0, b0) - b0: min(r1, b1) - b0])
    out = torch.cat(pieces) if pieces else torch.empty((0, *rest))
    return out[(slice(None), *meta.global_slices()[1:])]


def init_std(name: str, n_layers: int) -> float | None:
    """Standard deviation for parameter ``name``; None means ones (norm gains)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("wo.weight", "w2.weight")):  # residual projections, GPT-2 scaling
        return 0.02 / math.sqrt(2 * n_layers)
    return 0.02


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int, n_layers: int, device: torch.device | str | None = None) -> nn.Module:
    """Materialize ``model`` (possibly on the meta device) on ``device`` and fill every parameter.

    Every layout, serial or sharded, ends up holding the same global values.
    """
    if device is not None or any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device or "cpu")
    for name, p, meta in iter_params(model):
        p.zero_()  # padding beyond meta.shape stays zero
        std = init_std(name, n_layers)
        if std is None:
            vals = torch.ones(meta.shape)
        else:
            vals = normal_slice(seed, name, meta, std)
        p[meta.local_slices()] = vals.to(device=p.device, dtype=p.dtype)
    return model
