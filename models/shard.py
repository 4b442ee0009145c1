"""The shard metadata every layout shares: where a local tensor sits in its global tensor.

A module that holds a shard of a global parameter records where it sits in ``module.shard_meta``
(a dict from parameter attribute name to `ShardMeta`). The metadata lives on the module, not on the
parameter, because ``to_empty``/``_apply`` may replace parameter objects. Initialization,
checkpoints, the optimizer and tensor parallelism all read it from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn


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
