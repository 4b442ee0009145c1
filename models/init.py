"""Layout-independent initialization and the shard metadata every layout shares.

A parameter's initial value is a function of ``(seed, global name)`` only. Values are drawn
in blocks of rows of the *global* tensor, each block from its own generator, so a shard can be
filled with exactly the values the serial model holds in that slice without ever building the
whole tensor (only the row blocks it touches).

A module that holds a shard of a global parameter records where it sits in ``module.shard_meta``
(a dict from parameter attribute name to `ShardMeta`). The metadata lives on the module, not on the
parameter, because ``to_empty``/``_apply`` may replace parameter objects.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

ROW_BLOCK = 256  # rows of the global tensor drawn from one generator


@dataclass(frozen=True)
class ShardMeta:
    """Where a local tensor sits in its global tensor.

    ``offset`` is the global index of the local tensor's first element on each dim; ``shape`` is
    the extent of real data it holds, which may be smaller than the local tensor when the local
    tensor carries padding (a vocabulary padded to a multiple of tp, say) at its end.
    """

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def full(cls, shape) -> "ShardMeta":
        shape = tuple(int(s) for s in shape)
        return cls(shape, (0,) * len(shape), shape)

    @property
    def is_full(self) -> bool:
        return self.shape == self.global_shape

    def global_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))

    def local_slices(self) -> tuple[slice, ...]:
        return tuple(slice(0, s) for s in self.shape)


def set_shard_meta(module: nn.Module, attr: str, meta: ShardMeta) -> None:
    if not hasattr(module, "shard_meta"):
        module.shard_meta = {}
    module.shard_meta[attr] = meta


def shard_meta(model: nn.Module, name: str) -> ShardMeta:
    """The `ShardMeta` of parameter ``name`` (dotted) in ``model``; full when none was recorded."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    meta = getattr(module, "shard_meta", {}).get(attr)
    return meta if meta is not None else ShardMeta.full(getattr(module, attr).shape)


def iter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ShardMeta]]:
    """(global name, local parameter, shard metadata) for every parameter, tied ones once."""
    for name, p in model.named_parameters():
        yield name, p, shard_meta(model, name)


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
