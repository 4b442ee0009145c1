"""Forward+backward time of each Triton kernel against torch eager and torch.compile, on one GPU.

    python scripts/bench_kernels.py [--tokens 8192] [--ops rms_norm,swiglu,rotary,cross_entropy]

For every op and shape (hidden 4096 and 8192; vocabulary 32k and 128k; bfloat16) it prints the
median fwd+bwd time of each implementation, the bandwidth it achieves (the bytes the op must move
at least, divided by the time), that bandwidth as a share of the device's measured copy bandwidth,
the peak memory allocated beyond the inputs, and our speed-up over eager and compile. Goals (H100):
memory-bound kernels at >= 85% of copy bandwidth and no slower than torch.compile; cross-entropy
peak memory <= 1/4 of eager's.

Without CUDA it says so and exits 0: the kernels' correctness is tested on the CPU
(tests/unit/test_kernels.py, TRITON_INTERPRET=1), their speed only means something on a GPU.
``--dry-run`` exercises this script's code paths on the CPU under TRITON_INTERPRET=1 with toy
shapes (numbers meaningless); it is how the script itself was checked on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="rows (batch x sequence) per call")
    p.add_argument("--ops", default="rms_norm,swiglu,rotary,cross_entropy")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--dry-run", action="store_true", help="toy shapes on the CPU under TRITON_INTERPRET=1")
    return p.parse_args()


# ---- timing and memory -----------------------------------------------------------------------------

def time_ms(fn, device) -> float:
    """Median milliseconds of fn() (triton's do_bench on CUDA: warm-up, L2 flush, CUDA events)."""
    if device.type == "cuda":
        import triton.testing  # CUDA only: Triton is optional on a CPU machine

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device) -> float:
    """Peak memory allocated during one fn() beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth_gbs(device) -> float:
    """Measured device-to-device copy bandwidth (read + write), the ceiling for memory-bound kernels."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---- the cases -------------------------------------------------------------------------------------

class Case:
    """One op at one shape: how to make its inputs, the leaves to differentiate, the implementations,
    and the bytes the op must move at least (fwd+bwd), which turns a time into a bandwidth."""

    def __init__(self, op, shape, make_inputs, leaves, impls, bytes_moved):
        self.op, self.shape, self.make_inputs, self.leaves = op, shape, make_inputs, leaves
        self.impls, self.bytes_moved = impls, bytes_moved


def fwd_bwd(fn, case):
    """A closure running fn forward and backward (autograd.grad: no .grad accumulation between runs).
    Upstream gradients are made once, outside the timed region."""
    grads = {}

    def step():
        out = fn(*case.make_inputs())
        outs = out if isinstance(out, tuple) else (out,)
        if not grads:
            grads["g"] = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, case.leaves, grads["g"])
    return step


def cases(args, device, dtype):
    # not at the top: main() sets TRITON_INTERPRET for --dry-run first, and Triton reads it when
    # kernels/ is imported
    from kernels import rope_cos_sin
    from kernels.cross_entropy import cross_entropy, cross_entropy_reference
    from kernels.rms_norm import rms_norm, rms_norm_reference
    from kernels.rotary import apply_rotary, apply_rotary_reference
    from kernels.swiglu import swiglu, swiglu_reference

    n = args.tokens
    hiddens = [(4096, 14336), (8192, 28672)] if not args.dry_run else [(40, 72)]
    vocabs = [32000, 128256] if not args.dry_run else [300]
    el = torch.finfo(dtype).bits // 8
    ops = args.ops.split(",")
    out = []

    def leaf(*shape, dt=dtype):
        return torch.randn(*shape, device=device).to(dt).requires_grad_()

    for hidden, ffn in hiddens:
        if "rms_norm" in ops:
            x, w = leaf(n, hidden), leaf(hidden, dt=torch.float32)
            out.append(Case("rms_norm", f"{n}x{hidden}", lambda x=x, w=w: (x, w), [x, w],
                            {"triton": lambda x, w: rms_norm(x, w, 1e-5),
                             "eager": lambda x, w: rms_norm_reference(x, w, 1e-5)},
                            5 * n * hidden * el))  # fwd: read x, write y; bwd: read dy, x, write dx
        if "swiglu" in ops:
            g, u = leaf(n, ffn), leaf(n, ffn)
            out.append(Case("swiglu", f"{n}x{ffn}", lambda g=g, u=u: (g, u), [g, u],
                            {"triton": swiglu, "eager": swiglu_reference},
                            8 * n * ffn * el))  # fwd: 2 reads, 1 write; bwd: 3 reads, 2 writes
        if "rotary" in ops:
            hd = 128 if not args.dry_run else 8
            heads = hidden // hd
            seq = 2048 if not args.dry_run else 4
            q = leaf(n // seq, seq, heads, hd)
            cos, sin = rope_cos_sin(seq, hd, 500000.0, device=device)
            out.append(Case("rotary", f"{n // seq}x{seq}x{heads}x{hd}", lambda q=q: (q, cos, sin), [q],
                            {"triton": apply_rotary, "eager": apply_rotary_reference},
                            4 * q.numel() * el))  # fwd: read, write; bwd: read, write
    if "cross_entropy" in ops:
        for v in vocabs:
            base = leaf(n, v)
            targets = torch.randint(0, v, (n,), device=device)
            # A view of the leaf is not a leaf, like the model's logits (a matmul output): the Triton
            # path then writes its gradient in place, as in training. It overwrites ``base`` with
            # gradients, which changes no timing (any finite values do).
            out.append(Case("cross_entropy", f"{n}x{v}", lambda b=base, t=targets: (b.view_as(b), t), [base],
                            {"triton": cross_entropy, "eager": cross_entropy_reference},
                            3 * n * v * el))  # read the logits twice, write the gradient once
    for c in out:
        if not args.no_compile:
            c.impls["compile"] = torch.compile(c.impls["eager"], dynamic=False)
    return out


def run_case(case, device):
    rows = {}
    for name, fn in case.impls.items():
        step = fwd_bwd(fn, case)
        ms = time_ms(step, device)
        rows[name] = (ms, case.bytes_moved / ms / 1e6, peak_extra_mib(step, device))
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    args = parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ imports triton
        device = torch.device("cpu")
        args.tokens = 8
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU and found none: nothing to measure here. The kernels are "
              "tested on the CPU by tests/unit/test_kernels.py (TRITON_INTERPRET=1); --dry-run checks this script.")
        return 0
    else:
        device = torch.device("cuda")
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: numbers meaningless)"
    bw = copy_bandwidth_gbs(device)
    print(f"device: {name}; torch {torch.__version__}; dtype bfloat16; measured copy bandwidth {bw:.0f} GB/s\n")
    print("| op | shape | impl | fwd+bwd ms | GB/s | % copy BW | peak extra MiB | triton speed-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for case in cases(args, device, dtype):
        rows = run_case(case, device)
        t_ms = rows["triton"][0]
        for impl, (ms, gbs, mib) in rows.items():
            print(f"| {case.op} | {case.shape} | {impl} | {ms:.3f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {mib:.0f} "
                  f"| {ms / t_ms:.2f}x |")
        frac = rows["triton"][1] / bw
        ok_bw = frac >= 0.85
        ok_compile = "compile" not in rows or t_ms <= rows["compile"][0]
        line = f"{case.op} {case.shape}: {100 * frac:.0f}% of copy BW ({'ok' if ok_bw else 'BELOW 85%'}), " \
               f"{'no slower than' if ok_compile else 'SLOWER than'} torch.compile"
        if case.op == "cross_entropy":
            ratio = rows["triton"][2] / rows["eager"][2] if rows["eager"][2] else float("nan")
            line += f", peak memory {ratio:.2f} of eager's ({'ok' if ratio <= 0.25 else 'ABOVE 1/4'})"
        verdicts.append(line)
    print("\ngoals (>= 85% of copy bandwidth, no slower than torch.compile, cross-entropy peak <= 1/4 eager):")
    for v in verdicts:
        print(" ", v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
