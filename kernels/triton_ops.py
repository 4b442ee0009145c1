"""The Triton implementations of the four fused operations, in the shape ``models/`` calls them.

`kernels.get_ops` packs them into its `Ops`; this module does not import the package, which imports
it, so the two form no circle."""
from kernels.cross_entropy import cross_entropy
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary
from kernels.swiglu import swiglu

__all__ = ["cross_entropy", "rms_norm", "apply_rotary", "swiglu"]
