"""SwiGLU activation: silu(gate) * up, elementwise, computed in float32 and rounded once.

Layering as in rms_norm.py. The backward recomputes sigmoid(gate) from the saved inputs rather
than saving silu(gate): one more exp per element, one less tensor held per MLP.
"""
import torch
import torch.nn.functional as F

from kernels._triton import as_rows, check_float, check_launchable, launch, num_warps, tl, triton

BLOCK = 1024  # columns per program; rows are the second grid axis


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, N,
                       BLOCK: tl.constexpr):
    """du = dy * silu(g);  dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    dg = dy * u * (sig + silu * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)


def _check(gate, up):
    op = "swiglu"
    check_float(op, "gate", gate)
    check_float(op, "up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if gate.dim() == 0:
        raise ValueError("swiglu: inputs must have at least one dimension")
    check_launchable(op, gate, up)


def _grid(n_rows, n):
    return (n_rows, triton.cdiv(n, BLOCK))


def swiglu_forward(gate, up):
    g2, u2 = as_rows(gate), as_rows(up)
    n_rows, n = g2.shape
    y = torch.empty((n_rows, n), dtype=gate.dtype, device=gate.device)
    if y.numel():
        launch(_swiglu_fwd_kernel, _grid(n_rows, n), g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n, BLOCK=BLOCK,
                                             num_warps=num_warps(BLOCK))
    return y, g2, u2


def swiglu_backward(dy, g2, u2):
    dy2 = as_rows(dy)
    n_rows, n = g2.shape
    dg = torch.empty((n_rows, n), dtype=g2.dtype, device=g2.device)
    du = torch.empty_like(dg)
    if dg.numel():
        launch(_swiglu_bwd_kernel, _grid(n_rows, n), dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0),
                                             dg.stride(0), du.stride(0), n, BLOCK=BLOCK,
                                             num_warps=num_warps(BLOCK))
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y, g2, u2 = swiglu_forward(gate, up)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = swiglu_backward(dy, g2, u2)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype; output in that dtype."""
    _check(gate, up)
    return SwiGLUFunction.apply(gate, up)
