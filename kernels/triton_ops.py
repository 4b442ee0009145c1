"""The Triton implementations of the four fused operations, in the shape ``models/`` calls them.

`kernels.get_ops` packs them into its `Ops`; this module does not import the package, which imports
it, so the two form no circle. Inside a compiled block (``train.compile``) the block's three go
through `kernels.compiled_ops`, the same launchers as custom ops the compiler does not trace into."""
import torch

import kernels.compiled_ops as compiled_ops
import kernels.rms_norm as _rms_norm
import kernels.rotary as _rotary
import kernels.swiglu as _swiglu
from kernels.cross_entropy import cross_entropy


def rms_norm(x, weight, eps, residual=None):
    if torch.compiler.is_compiling():
        return compiled_ops.rms_norm(x, weight, eps, residual)
    return _rms_norm.rms_norm(x, weight, eps, residual)


def swiglu(gate, up):
    if torch.compiler.is_compiling():
        return compiled_ops.swiglu(gate, up)
    return _swiglu.swiglu(gate, up)


def apply_rotary(x, cos, sin):
    if torch.compiler.is_compiling():
        return compiled_ops.apply_rotary(x, cos, sin)
    return _rotary.apply_rotary(x, cos, sin)


__all__ = ["cross_entropy", "rms_norm", "apply_rotary", "swiglu"]
