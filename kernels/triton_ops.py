"""The Triton implementations of the four fused operations, in the shape ``models/`` calls them."""
from kernels import Ops
from kernels.cross_entropy import cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary
from kernels.swiglu import swiglu

TRITON_OPS = Ops(rms_norm, swiglu, apply_rotary, cross_entropy)

__all__ = ["TRITON_OPS", "cross_entropy", "rms_norm", "apply_rotary", "swiglu"]
