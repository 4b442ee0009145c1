"""The Triton kernels of a transformer block as custom ops, for compiled blocks (``train.compile``).

`torch.compile` cannot trace a Triton launch made through our launchers (the launch records itself
for the ahead-of-time compile, and the interpreter runs kernels on the host), and a graph break in a
block is not allowed. So inside a compiled block `kernels.triton_ops` calls these instead: each
forward and each backward launcher is one ``tandem::`` custom op, opaque to the compiler, with a
fake (shape-only) implementation, and the forward op's autograd formula calls the backward op. The
numbers are the launchers', so a compiled block with ``kernels=triton`` computes what the eager one
does. Custom-op outputs may not alias inputs: the residual sum of an RMSNorm without residual (which
is the input itself) is not returned, the input is saved instead.

The cross-entropy is not here: the loss runs outside the compiled blocks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import kernels.rms_norm as _rms
import kernels.rotary as _rot
import kernels.swiglu as _swi
from kernels._triton import as_rows

# -- RMSNorm (optionally fused with the residual add) -------------------------------------------


@torch.library.custom_op("tandem::rms_norm", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, s, rstd = _rms.rms_norm_forward(x, weight, eps, residual)
    s = s.view(x.shape) if residual is not None else x.new_empty(0)
    return y.view(x.shape), s, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    rows = x.numel() // x.shape[-1]
    # new_empty, not empty_like: the launchers return contiguous rows whatever the input's strides
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), s, x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("tandem::rms_norm_backward", mutates_args=())
def _rms_norm_bwd(dy: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, ds: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dx, dw = _rms.rms_norm_backward(dy, as_rows(s), weight, rstd, ds)   # as the eager backward
    return dx.view(s.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, s, weight, rstd, ds):
    return s.new_empty(s.shape), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(s if ctx.has_residual else x, weight, rstd)


def _rms_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, s, weight, rstd, ds if ctx.has_residual else None)
    return dx, dw, (dx if ctx.has_residual else None), None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """`kernels.rms_norm.rms_norm`, as custom ops."""
    _rms._check(x, weight, residual)
    y, s, _ = _rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, s)


# -- SwiGLU -----------------------------------------------------------------------------------------


@torch.library.custom_op("tandem::swiglu", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return _swi.swiglu_forward(gate, up)[0].view(gate.shape)


@_swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tandem::swiglu_backward", mutates_args=())
def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dg, du = _swi.swiglu_backward(dy, as_rows(gate), as_rows(up))
    return dg.view(gate.shape), du.view(gate.shape)


@_swiglu_bwd.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    return _swiglu_bwd(dy, *ctx.saved_tensors)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`kernels.swiglu.swiglu`, as custom ops."""
    _swi._check(gate, up)
    return _swiglu_fwd(gate, up)


# -- rotary embedding -------------------------------------------------------------------------------


@torch.library.custom_op("tandem::rotary", mutates_args=())
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    return _rot._rotate(x, cos, sin, backward)


@_rotary.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, backward = inputs
    ctx.backward = backward
    ctx.save_for_backward(cos, sin)


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary(dy, cos, sin, not ctx.backward), None, None, None


_rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`kernels.rotary.apply_rotary`, as custom ops (no gradient to the tables)."""
    _rot._check(x, cos, sin)
    return _rotary(x, cos, sin, False)
