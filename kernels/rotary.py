"""Rotary position embeddings, rotate-half convention (as Hugging Face Llama).

With x = [x1, x2] split in halves of the head dim and rotate_half(x) = [-x2, x1]:

    out = x * cos + rotate_half(x) * sin      i.e.  out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2

The map is linear in x, and its transpose (the backward) is the same kernel with the sine terms
swapped and negated: dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1.

Layering as in rms_norm.py: one program per (batch, position) rotates all heads of that token.
"""
import torch

from kernels._triton import check_float, check_launchable, launch, num_warps, tl, triton


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, *, device=None, dtype=torch.float32):
    """cos, sin of shape (seq_len, head_dim) for the rotate-half form."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim)."""
    c = cos[None, :, None, :].float()
    s = sin[None, :, None, :].float()
    xf = x.float()
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, T, H, HALF, sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, sc_t, ss_t,
                   BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < HALF)
    dmask = d < HALF
    c1 = tl.load(COS + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * sc_t + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * ss_t + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * ss_t + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    xp = X + b * sx_b + t * sx_t + h * sx_h + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    yp = Y + b * sy_b + t * sy_t + h * sy_h + d
    tl.store(yp, (x1 * c1 - x2 * sa).to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, (x2 * c2 + x1 * sb).to(Y.dtype.element_ty), mask=mask)


def _check(x, cos, sin):
    op = "apply_rotary"
    check_float(op, "x", x)
    check_float(op, "cos", cos)
    check_float(op, "sin", sin)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    _, T, _, D = x.shape
    if D % 2:
        raise ValueError(f"{op}: head_dim {D} must be even for the rotate-half form")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, D):
            raise ValueError(f"{op}: {name} must be (seq, head_dim) = {(T, D)} to match x {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}; build it with rope_cos_sin(seq, head_dim, theta)")
    check_launchable(op, x, cos, sin)


def _rotate(x, cos, sin, backward):
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    block_h, block_d = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
    if y.numel():
        launch(_rotary_kernel, (B * T,), x, cos, sin, y, T, H, D // 2, *x.stride()[:3], *y.stride()[:3], cos.stride(0),
                                 sin.stride(0), BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d,
                                 num_warps=num_warps(block_h * block_d))
    return y


class RotaryFunction(torch.autograd.Function):
    """Gradient for x only: cos and sin are position tables, not learned."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k. x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim). Output in x's dtype."""
    _check(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: cos and sin must not require grad (no gradient flows to the position "
                         "tables); use apply_rotary_reference to differentiate through them")
    return RotaryFunction.apply(x, cos, sin)
