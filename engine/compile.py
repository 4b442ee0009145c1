"""``train.compile=true``: every transformer block compiled with `torch.compile`, whole.

Each `models.llama.TransformerBlock` is compiled in place (`nn.Module.compile`: parameter names,
hooks and checkpoints are unchanged) with ``fullgraph=True``, so a graph break inside a block is a
launch error, never a silent fallback to eager; the embedding, the final norm, the head and the
loss stay eager. What a block contains is traced as one graph:

* the tensor-parallel mappings' autograd Functions: Dynamo turns their ``dist`` collectives into
  functional collectives (all-reduce, all-gather, reduce-scatter), in forward and in backward;
* activation recompute (``torch.utils.checkpoint``, non-reentrant) becomes recomputation the
  compiler schedules in the block's backward;
* the zero-bubble pipeline's deferred weight gradients (`engine.pipeline.weight_grad`) go
  through two opaque custom ops, so the compiled backward stashes what W needs instead of
  computing the weight gradient;
* the Triton kernels (``kernels=triton``) are custom ops with fake (shape) implementations
  (`kernels.compiled_ops`), so the compiler calls them instead of tracing into them.

The rotary tables are built before the first compiled call (`warm_rope`): a table built inside a
block would be a Python side effect in the graph. docs/parallelism.md ("Compiled blocks") has the known
limits, docs/benchmarks.md the measured speed.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

BACKENDS = ("inductor", "aot_eager")


def compiler_problem(backend: str, device: torch.device) -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot run on ``device`` here (None if it can)."""
    if backend not in BACKENDS:
        return f"train.compile_backend={backend!r} is not one of {', '.join(BACKENDS)}"
    if not torch._dynamo.is_dynamo_supported():
        return ("train.compile=true but torch.compile is not supported by this Python/torch build; "
                "set train.compile=false")
    if backend != "inductor":
        return None
    if device.type == "cpu":
        if _cxx() is None:
            return ("train.compile=true with train.compile_backend=inductor compiles C++ on the CPU, but no C++ "
                    f"compiler ({', '.join(_cxx_names())}) is on PATH; install one (e.g. apt-get install g++), set "
                    "CXX to one, or use train.compile_backend=aot_eager (no code generation) or train.compile=false")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("train.compile=true with train.compile_backend=inductor generates Triton kernels on the GPU, but "
                    "triton is not installed; pip install triton, or set train.compile=false")
    return None


def _cxx_names() -> list[str]:
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, (tuple, list)) else (config.cpp.cxx,)
    return [n for n in (os.environ.get("CXX"), *names) if n]


def _cxx() -> str | None:
    """The first C++ compiler inductor would find, or None."""
    for name in _cxx_names():
        found = shutil.which(name)
        if found:
            return found
    return None


def warm_rope(model: nn.Module, seq_len: int, device: torch.device) -> None:
    """Build the model's rotary tables for the full sequence before any block is compiled."""
    for block in model.layers.values():
        block.attention.rope.get(seq_len, device)
        return  # one table set per model, shared by its blocks


def compile_blocks(model: nn.Module, *, backend: str, seq_len: int, device: torch.device) -> None:
    """Compile every transformer block of ``model`` (a `Llama` or a stage chunk) in place, whole."""
    warm_rope(model, seq_len, device)
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=True, dynamic=False)
