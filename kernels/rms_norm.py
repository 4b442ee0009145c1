"""RMSNorm over the last dimension, optionally fused with the residual add.

Layering: ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel`` (Triton) -> ``rms_norm_forward`` /
``rms_norm_backward`` (launchers: flatten to rows, allocate, pick the block) -> ``RMSNormFunction``
-> ``rms_norm`` (functional API). ``rms_norm_reference`` is the plain-torch definition tests compare to.

Numerics follow the reference: statistics and the product with the weight in float32, one rounding
to the input dtype at the end. The residual sum ``x + residual`` is rounded to the input dtype (it is
the new residual stream, stored in that dtype). The forward keeps one float32 per row (1/rms) for the
backward instead of recomputing it.
"""
import torch

from kernels._triton import as_rows, check_float, check_launchable, n_programs, num_warps, tl, triton

MAX_HIDDEN = 65536  # one program holds a whole row in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain-torch RMSNorm. With ``residual``: returns (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return rms_norm_reference(x, weight, eps), x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(X, R, S, Y, W, RSTD, stride_x, stride_r, stride_s, stride_y, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded once, as torch does
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW_PART, stride_dy, stride_x, stride_ds, stride_dx,
                         n_rows, N, rows_per_program, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(w*dy*xhat)) (+ ds, the residual stream's own gradient).

    Each program walks a contiguous range of rows and writes one partial sum of dy*xhat for dw;
    the launcher adds the partials (a (programs, N) float32 buffer, not (rows, N)).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_stop = tl.minimum(row_start + rows_per_program, n_rows)
    for i in range(0, row_stop - row_start):
        row = row_start + i
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = w * dy
        c = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _check(x, weight, residual):
    op = "rms_norm"
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} does not match the last dim of x "
                         f"{tuple(x.shape)}; it must be ({x.shape[-1] if x.dim() else '?'},)")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {x.shape[-1]} exceeds {MAX_HIDDEN}; use kernels=torch")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype}")
        check_launchable(op, x, weight, residual)
    else:
        check_launchable(op, x, weight)


def rms_norm_forward(x, weight, eps, residual=None):
    """Returns (y, s, rstd): y and s (= x + residual, or x itself) as (rows, N), rstd (rows,) float32."""
    x2 = as_rows(x)
    n_rows, n = x2.shape
    y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        s = torch.empty_like(y)
    else:
        r2, s = x2, x2
    block = triton.next_power_of_2(n)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](x2, r2, s, y, weight, rstd, x2.stride(0), r2.stride(0), s.stride(0),
                                        y.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                        num_warps=num_warps(block))
    return y, s, rstd


def rms_norm_backward(dy, s, weight, rstd, ds=None):
    """Gradients (dx as (rows, N) in s's dtype, dw in weight's dtype) given dy, and ds for the residual."""
    dy2 = as_rows(dy)
    n_rows, n = s.shape
    dx = torch.empty((n_rows, n), dtype=s.dtype, device=s.device)
    programs = n_programs(s.device, n_rows)
    rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 1
    programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 1
    dw_part = torch.zeros((programs, n), dtype=torch.float32, device=s.device)
    ds2 = as_rows(ds) if ds is not None else dy2
    block = triton.next_power_of_2(n)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](dy2, s, weight, rstd, ds2, dx, dw_part, dy2.stride(0), s.stride(0),
                                          ds2.stride(0), dx.stride(0), n_rows, n, rows_per_program,
                                          HAS_DS=ds is not None, BLOCK=block, num_warps=num_warps(block))
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s, rstd = rms_norm_forward(x, weight, eps, residual)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = x.shape
        ctx.has_residual = residual is not None
        if residual is None:
            return y.view(x.shape)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, s, weight, rstd, ds)
        dx = dx.view(ctx.shape)
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of ``x`` over its last dim (any leading shape), times ``weight``; output in x's dtype.

    With ``residual``: computes ``s = x + residual`` once and returns ``(rms_norm(s), s)``, the
    normed input of the next sub-block and the new residual stream, in one pass over memory.
    """
    _check(x, weight, residual)
    return RMSNormFunction.apply(x, weight, residual, float(eps))
