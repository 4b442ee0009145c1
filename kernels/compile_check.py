"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, on a machine with no GPU.

``triton.compile`` runs the whole NVIDIA pipeline (Triton IR -> LLVM -> PTX -> ptxas -> cubin) for a
``GPUTarget`` without touching a driver. The launches compiled are the ones the launchers themselves
choose: each case below calls a launcher on meta tensors inside ``recording_launches``, which records
kernel, grid, arguments and options instead of launching; the arguments then go through the kernel's
own binder, so the specialization (dtypes, 16-byte divisibility, constexprs) is what a real launch
would produce. Per compiled kernel we read registers, stack and shared memory from the cubin
(``cuobjdump --dump-resource-usage``, bundled with Triton) and spill bytes from ``ptxas -v``.

Used by scripts/compile_kernels.py and tests/unit/test_compile_kernels.py. Needs Triton's compiler, so it
must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled). Triton is imported
inside the functions that compile: it is optional where kernels/ is imported (`kernels._triton`), and
this module must import without it (scripts/check_imports.py).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch

from kernels._triton import PROGRAMS_PER_SM, SM_COUNT, recording_launches, resident_programs
from kernels.cross_entropy import cross_entropy_forward, scale_rows_
from kernels.rms_norm import rms_norm_backward, rms_norm_forward
from kernels.rotary import _rotate
from kernels.swiglu import swiglu_backward, swiglu_forward

TARGETS = (80, 90)
DTYPES = (torch.bfloat16, torch.float32)
TOKENS = (8192, 131072)
HIDDEN = (4096, 8192, 16384, 32768, 65536)  # 65536 = rms_norm.MAX_HIDDEN
FFN = (14336, 1792)  # Llama-3 8B, and its tp=8 shard
HEADS = (1, 8, 32, 128)  # head_dim 128
VOCAB = (128256, 16032)  # Llama-3, and its tp=8 shard
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


@dataclass(frozen=True)
class Shapes:
    """The shapes the cases cover; ``QUICK`` keeps one of each kind of launch (for the test)."""
    dtypes: tuple = DTYPES
    tokens: tuple = TOKENS
    hidden: tuple = HIDDEN
    ffn: tuple = FFN
    heads: tuple = HEADS
    vocab: tuple = VOCAB


# every constexpr variant still appears: one-pass and blocked rows, both dtypes, 1 head and many
QUICK = Shapes(tokens=(8192,), hidden=(4096, 8192, 65536), ffn=(1792,), heads=(1, 32), vocab=(16032,))


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _rms_norm(dtype, tokens, hidden):
    w = _meta(hidden, dtype=dtype)
    for residual in (None, _meta(tokens, hidden, dtype=dtype)):
        x = _meta(tokens, hidden, dtype=dtype)
        _, s, rstd = rms_norm_forward(x, w, 1e-5, residual)
        rms_norm_backward(_meta(tokens, hidden, dtype=dtype), s, w, rstd, None if residual is None else x)


def _swiglu(dtype, tokens, ffn):
    _, g2, u2 = swiglu_forward(_meta(tokens, ffn, dtype=dtype), _meta(tokens, ffn, dtype=dtype))
    swiglu_backward(_meta(tokens, ffn, dtype=dtype), g2, u2)


def _rotary(dtype, tokens, heads):
    seq = min(tokens, 8192)
    cos = sin = _meta(seq, 128, dtype=torch.float32)
    for backward in (False, True):
        _rotate(_meta(tokens // seq, seq, heads, 128, dtype=dtype), cos, sin, backward)


def _cross_entropy(dtype, tokens, vocab):
    logits = _meta(tokens, vocab, dtype=dtype)
    cross_entropy_forward(logits, _meta(tokens, dtype=torch.int64), -100, None, logits)
    scale_rows_(logits, _meta(1, dtype=torch.float32))  # the backward's in-place scale of that gradient


def cases(shapes: Shapes):
    """(label, call) for every launcher call to record; each call runs the launchers on meta tensors."""
    kinds = (("rms_norm", _rms_norm, shapes.hidden, "hidden"), ("swiglu", _swiglu, shapes.ffn, "ffn"),
             ("rotary", _rotary, shapes.heads, "heads"), ("cross_entropy", _cross_entropy, shapes.vocab, "vocab"))
    for (op, fn, sizes, what), dtype, tokens in product(kinds, shapes.dtypes, shapes.tokens):
        for size in sizes:
            label = f"{op} {str(dtype).removeprefix('torch.')} {what}={size} tokens={tokens}"
            yield label, (lambda fn=fn, dtype=dtype, tokens=tokens, size=size: fn(dtype, tokens, size))


@dataclass
class Job:
    """One distinct compile: a kernel at one specialization for one target."""
    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    programs_per_sm: int | None
    labels: list


def _specialize(launch, arch):
    """What the kernel's binder makes of the recorded arguments: (signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def plan(shapes: Shapes = Shapes(), targets=TARGETS) -> list[Job]:
    """Every distinct compile the launchers ask for at these shapes, on these targets."""
    jobs: dict = {}
    for arch in targets:
        for label, call in cases(shapes):
            with recording_launches(SM_COUNT[arch]) as launches:
                call()
            for launch in launches:
                signature, constexprs, attrs, options = _specialize(launch, arch)
                key = (launch.kernel.__name__, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
                if key not in jobs:
                    jobs[key] = Job(launch.kernel.fn.__module__, launch.kernel.__name__, arch, signature, constexprs,
                                    attrs, options, None, [])
                job = jobs[key]
                job.labels.append(label)
                if launch.programs_per_sm:  # one binary, several grids: check the most demanding one
                    job.programs_per_sm = max(job.programs_per_sm or 0, launch.programs_per_sm)
    return list(jobs.values())


@dataclass
class Result:
    job: Job
    error: str | None = None
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    warps: int = 0

    @property
    def spills(self) -> bool:
        return self.error is None and (self.spill_stores or self.spill_loads or self.stack or self.local) > 0

    @property
    def resident(self) -> int:
        """Programs of this kernel that fit on one SM together (registers, threads, shared memory)."""
        by_smem = SHARED_PER_SM[self.job.arch] // self.shared if self.shared else PROGRAMS_PER_SM
        return min(resident_programs(self.registers, self.warps), by_smem)

    @property
    def under_occupied(self) -> bool:
        """The launcher sized its grid for more resident programs than the compiled kernel allows."""
        return self.error is None and (self.job.programs_per_sm or 0) > self.resident


def _ptxas_log_path(kernel_hash: str) -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "tandem_ptxas_logs" / f"{kernel_hash}.log"


def _compile(job: Job):
    """The compiled kernel and its ptxas -v log (kept beside Triton's cache, which skips ptxas on a hit)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
    target = GPUTarget("cuda", job.arch, 32)
    for always in (False, True):  # a cache hit has no log: unless we kept it, compile once more
        out = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(out):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = always
            compiled = triton.compile(src, target=target, options=job.options)
        log_path = _ptxas_log_path(compiled.hash)
        if "ptxas" in out.getvalue():
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(out.getvalue())
        if log_path.exists():
            return compiled, log_path.read_text()
    raise RuntimeError("ptxas -v printed no log")


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from cuobjdump --dump-resource-usage."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_job(job: Job) -> Result:
    try:
        compiled, log = _compile(job)
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - any failure is reported in the table, not raised
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return Result(job, error=f"{type(e).__name__}: {first_line}")
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stores, loads = (int(spill[1]), int(spill[2])) if spill else (0, 0)
    return Result(job, registers=usage["REG"], spill_stores=stores, spill_loads=loads, stack=usage["STACK"],
                  local=usage["LOCAL"], shared=compiled.metadata.shared, warps=compiled.metadata.num_warps)


def compile_all(jobs: list[Job], workers: int) -> list[Result]:
    """Compile in ``workers`` processes (forked: they inherit the imported kernels; only meta tensors exist)."""
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, jobs))


def _constexprs(job: Job) -> str:
    names = list(job.signature)  # the constexprs are keyed by (argument index,)
    return " ".join(f"{names[path[0]]}={v}" for path, v in job.constexprs.items())


def table(results: list[Result]) -> str:
    head = ("kernel", "target", "constexprs", "warps", "regs", "spill B", "shared B", "resident/assumed", "first of")
    rows = [head]
    for r in results:
        j = r.job
        occupancy = f"{r.resident}/{j.programs_per_sm}" if j.programs_per_sm else f"{r.resident}/-"
        labels = j.labels[0] + (f" (+{len(j.labels) - 1})" if len(j.labels) > 1 else "")
        if r.error:
            rows.append((j.kernel, f"sm_{j.arch}", _constexprs(j), "-", "-", "-", "-", "-", f"FAILED {r.error}"))
        else:
            rows.append((j.kernel, f"sm_{j.arch}", _constexprs(j), str(r.warps), str(r.registers),
                         f"{r.spill_stores}/{r.spill_loads}", str(r.shared), occupancy, labels))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def summary(results: list[Result]) -> str:
    failed = sum(r.error is not None for r in results)
    spilling = sum(r.spills for r in results)
    return f"{len(results) - failed} compiled, {failed} failed, {spilling} spilling"


def default_cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".cache" / "tandem" / "compile_kernels")
