"""RMSNorm over the last dimension, optionally fused with the residual add."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Plain-torch RMSNorm. With ``residual``: returns (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
        return rms_norm_reference(x, weight, eps), x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)
