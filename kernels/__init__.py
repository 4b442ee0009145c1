"""Fused operations: Triton kernels, each with its plain-torch reference.

`get_ops(impl)` returns the four operations the model calls, for ``impl`` in
``auto | triton | torch`` (auto = Triton on CUDA, torch elsewhere).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from kernels.cross_entropy import cross_entropy_torch
from kernels.rms_norm import rms_norm_reference
from kernels.rotary import apply_rotary_reference, rope_cos_sin
from kernels.swiglu import swiglu_reference

IMPLS = ("auto", "triton", "torch")


class Ops(NamedTuple):
    rms_norm: Callable
    swiglu: Callable
    apply_rotary: Callable
    cross_entropy: Callable


TORCH_OPS = Ops(rms_norm_reference, swiglu_reference, apply_rotary_reference, cross_entropy_torch)


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown kernels={impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return impl


def get_ops(impl: str = "auto") -> Ops:
    impl = resolve_impl(impl)
    if impl == "torch":
        return TORCH_OPS
    from kernels import triton_ops  # imported lazily: needs triton

    return Ops(triton_ops.rms_norm, triton_ops.swiglu, triton_ops.apply_rotary, triton_ops.cross_entropy)


__all__ = ["IMPLS", "Ops", "TORCH_OPS", "get_ops", "resolve_impl", "rope_cos_sin"]
