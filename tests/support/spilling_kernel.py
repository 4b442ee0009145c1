"""A kernel that must spill: 8192 float32 values live across a reduction in one warp (256 per thread,
over the 255-register limit). tests/unit/test_compile_kernels.py compiles it to prove spills are detected."""
import triton
import triton.language as tl


@triton.jit
def spilling_kernel(X, Y, BLOCK: tl.constexpr):
    x = tl.load(X + tl.arange(0, BLOCK))
    tl.store(Y + tl.arange(0, BLOCK), x * tl.sum(x * x, axis=0))
