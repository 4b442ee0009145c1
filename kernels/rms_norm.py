"""RMSNorm over the last dimension, optionally fused with the residual add.

Layering: ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel`` (Triton) -> ``rms_norm_forward`` /
``rms_norm_backward`` (launchers: flatten to rows, allocate, pick the block) -> ``RMSNormFunction``
-> ``rms_norm`` (functional API). ``rms_norm_reference`` is the plain-torch definition tests compare to.

Numerics follow the reference: statistics and the product with the weight in float32, one rounding
to the input dtype at the end. The residual sum ``x + residual`` is rounded to the input dtype (it is
the new residual stream, stored in that dtype). The forward keeps one float32 per row (1/rms) for the
backward instead of recomputing it.

Registers: a row of up to ``ROW_BLOCK`` columns is held whole by one program (one pass over memory);
a longer row is walked in column blocks, in two passes (statistics, then output; for the backward a
per-row dot product, then a (row ranges, column blocks) grid), so no thread ever holds more than 16
elements of a vector and nothing spills up to ``MAX_HIDDEN`` on sm_80/sm_90 (docs/kernels.md).
"""
import torch

from kernels._triton import (as_rows, check_float, check_launchable, launch, n_programs, resident_programs,
                             row_warps, tl, triton)

MAX_HIDDEN = 65536  # checked spill-free up to here by scripts/compile_kernels.py
# A row of up to this many columns is held in registers by one program (16 elements per thread at
# 16 warps); longer rows are walked in blocks of this many columns, in two passes.
ROW_BLOCK = 8192
COL_BLOCK = 1024  # columns per program of the blocked backward (its grid's second axis)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain-torch RMSNorm. With ``residual``: returns (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return rms_norm_reference(x, weight, eps), x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@triton.jit
def _load_sum(X, R, S, row, stride_x, stride_r, stride_s, cols, N, HAS_RESIDUAL: tl.constexpr):
    """x (or s = x + residual, rounded once to x's dtype as torch does, and stored) in float32."""
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _store_normed(Y, W, row, stride_y, cols, N, xf, rstd):
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(X, R, S, Y, W, RSTD, stride_x, stride_r, stride_s, stride_y, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """One program per row. ONE_PASS: the row fits one block and stays in registers; otherwise a first
    pass over column blocks sums squares (and writes s), a second reads s back and writes y."""
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        xf = _load_sum(X, R, S, row, stride_x, stride_r, stride_s, cols, N, HAS_RESIDUAL)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        _store_normed(Y, W, row, stride_y, cols, N, xf, rstd)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, N, BLOCK):
            xf = _load_sum(X, R, S, row, stride_x, stride_r, stride_s, off + tl.arange(0, BLOCK), N, HAS_RESIDUAL)
            acc += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.debug_barrier()  # s written above is visible to every thread of the program (S is X without residual)
        for off in range(0, N, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            xf = tl.load(S + row * stride_s + cols, mask=cols < N, other=0.0).to(tl.float32)
            _store_normed(Y, W, row, stride_y, cols, N, xf, rstd)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW_PART, stride_dy, stride_x, stride_ds, stride_dx,
                         n_rows, N, rows_per_program, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of up to BLOCK columns, each held whole in registers:
    dx = rstd * (w*dy - xhat * mean(w*dy*xhat)) (+ ds, the residual stream's own gradient).

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


@triton.jit
def _rms_norm_bwd_dot_kernel(DY, X, W, RSTD, C, stride_dy, stride_x, N, BLOCK: tl.constexpr):
    """Long rows, first pass: c = mean(w*dy*xhat) per row, over column blocks."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, N, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc += w * dy * x
    tl.store(C + row, tl.sum(acc, axis=0) * tl.load(RSTD + row) / N)


@triton.jit
def _rms_norm_bwd_blocked_kernel(DY, X, W, RSTD, C, DS, DX, DW_PART, stride_dy, stride_x, stride_ds, stride_dx,
                                 n_rows, N, rows_per_program, HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
    """Long rows, second pass: program (p, j) writes dx for columns block j of its row range and one
    partial sum of dy*xhat over those rows for dw, so only BLOCK columns are ever held in registers."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_stop = tl.minimum(row_start + rows_per_program, n_rows)
    for i in range(0, row_stop - row_start):
        row = row_start + i
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(RSTD + row)
        dx = (w * dy - xhat * tl.load(C + row)) * tl.load(RSTD + row)
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


def _row_block(n: int, row_block: int) -> tuple[int, bool]:
    """(columns per step, whether one step holds the whole row)."""
    block = triton.next_power_of_2(n)
    return (block, True) if block <= row_block else (row_block, False)


def _held_registers(block: int, warps: int, vectors: int) -> int:
    """Registers per thread of a program holding ``vectors`` float32 vectors of ``block`` columns, plus
    the addresses and scalars around them (an estimate; scripts/compile_kernels.py checks it holds)."""
    return vectors * block // (32 * warps) + 48


def rms_norm_forward(x, weight, eps, residual=None, *, row_block=ROW_BLOCK):
    """Returns (y, s, rstd): y and s (= x + residual, or x itself) as (rows, N), rstd (rows,) float32."""
    x2 = as_rows(x)
    weight = weight.contiguous()  # the kernel reads the weight at unit stride
    n_rows, n = x2.shape
    y = torch.empty((n_rows, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        s = torch.empty_like(y)
    else:
        r2, s = x2, x2
    block, one_pass = _row_block(n, row_block)
    if n_rows:
        launch(_rms_norm_fwd_kernel, (n_rows,), x2, r2, s, y, weight, rstd, x2.stride(0), r2.stride(0),
               s.stride(0), y.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_PASS=one_pass,
               num_warps=row_warps(block))
    return y, s, rstd


def rms_norm_backward(dy, s, weight, rstd, ds=None, *, row_block=ROW_BLOCK, col_block=COL_BLOCK):
    """Gradients (dx as (rows, N) in s's dtype, dw in weight's dtype) given dy, and ds for the residual.

    Rows that fit ``row_block`` columns: one kernel, each program holding its rows whole. Longer rows:
    a per-row dot product first, then a (row ranges, column blocks) grid for dx and dw.
    """
    dy2 = as_rows(dy)
    weight = weight.contiguous()
    n_rows, n = s.shape
    dx = torch.empty((n_rows, n), dtype=s.dtype, device=s.device)
    ds2 = as_rows(ds) if ds is not None else dy2
    if not n_rows:
        return dx, torch.zeros_like(weight)
    block, one_pass = _row_block(n, row_block)
    strides = (dy2.stride(0), s.stride(0), ds2.stride(0), dx.stride(0))
    if one_pass:
        warps = row_warps(block)
        per_sm = max(1, resident_programs(_held_registers(block, warps, 4), warps))  # w, dw, dy, x
        programs, rows_per_program = _split_rows(n_programs(s.device, n_rows, per_sm), n_rows)
        dw_part = torch.empty((programs, n), dtype=torch.float32, device=s.device)
        launch(_rms_norm_bwd_kernel, (programs,), dy2, s, weight, rstd, ds2, dx, dw_part, *strides, n_rows, n,
               rows_per_program, HAS_DS=ds is not None, BLOCK=block, num_warps=warps, programs_per_sm=per_sm)
        return dx, dw_part.sum(0).to(weight.dtype)
    c = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    launch(_rms_norm_bwd_dot_kernel, (n_rows,), dy2, s, weight, rstd, c, dy2.stride(0), s.stride(0), n,
           BLOCK=block, num_warps=row_warps(block))
    col_block = min(col_block, block)
    warps = row_warps(col_block)
    per_sm = max(1, resident_programs(_held_registers(col_block, warps, 5), warps))  # w, dw, dy, x, ds
    col_blocks = triton.cdiv(n, col_block)
    programs, rows_per_program = _split_rows(triton.cdiv(n_programs(s.device, n_rows * col_blocks, per_sm),
                                                         col_blocks), n_rows)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=s.device)
    launch(_rms_norm_bwd_blocked_kernel, (programs, col_blocks), dy2, s, weight, rstd, c, ds2, dx, dw_part,
           *strides, n_rows, n, rows_per_program, HAS_DS=ds is not None, BLOCK=col_block, num_warps=warps,
           programs_per_sm=per_sm)
    return dx, dw_part.sum(0).to(weight.dtype)


def _split_rows(programs: int, n_rows: int) -> tuple[int, int]:
    """(programs, rows per program) covering n_rows with at most ``programs`` programs, none empty."""
    rows_per_program = triton.cdiv(n_rows, programs)
    return triton.cdiv(n_rows, rows_per_program), rows_per_program


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
