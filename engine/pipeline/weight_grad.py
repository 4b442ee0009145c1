"""Zero-bubble weight-gradient deferral: an I action computes input gradients only, W the rest.

Every deferrable ``x · Wᵀ`` of a chunk is a module with a declared ``weight_grad_store`` (None
is plain autograd): each `models.llama.Linear`, the `matmul` of every tensor-parallel linear (the
vocab-parallel head included) and the tied head of a last stage (`Llama.tied_head`).
`enable_weight_grad_deferral` points them at one `WeightGradStore`; with it their forward runs
through `_DeferredWeightGrad`, whose backward returns only the input gradient while an I runs and
stashes (input, output-gradient); the W action turns the stash into the weight gradient. Other
parameters (norms, embedding lookups, biases) get their (cheap) gradients during I.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, linear_weight_grad, save_matmul_input,
                                    unpack_matmul_input)
from models.llama import Linear


class WeightGradStore:
    """(weight, input, output-gradient) triples deferred by I, keyed by (micro-batch, stage)."""

    def __init__(self):
        self.capturing: tuple[int, int] | None = None
        self.pending: dict[tuple[int, int], list] = {}
        self.weights: list[nn.Parameter] = []   # registered for the compiled path (`register`)
        # called with each weight right after a gradient is added to it (a W, or a B outside an I):
        # the data-parallel reducer counts these as it counts autograd's accumulations, so a bucket of
        # deferred weights is sent as soon as its last W has run, not at the end of the step
        self.on_grad: list = []
        _STORES.add(self)

    @contextlib.contextmanager
    def capture(self, key):
        self.capturing = key
        self.pending.setdefault(key, [])
        try:
            yield
        finally:
            self.capturing = None

    @torch.no_grad()
    def flush(self, key) -> None:
        for weight, x, g in self.pending.pop(key, []):
            self.accumulate(weight, x, g)

    @torch.no_grad()
    def accumulate(self, weight: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> None:
        dw = linear_weight_grad(g, x, weight.dtype)
        if weight.grad is None:
            weight.grad = dw
        else:
            weight.grad.add_(dw)
        for callback in self.on_grad:
            callback(weight)

    def matmul(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x · module.weightᵀ (no bias) with its weight gradient left to this store."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, module.weight)                   # nothing to defer
        if torch.compiler.is_compiling():                       # inside a compiled block (train.compile)
            # autocast: only x is cast (as F.linear's autocast would); the weight stays the Parameter's
            # own storage, which is how the backward op finds it (a cast weight is a new tensor)
            device = x.device.type
            if torch.is_autocast_enabled(device):
                x = x.to(torch.get_autocast_dtype(device))
            return deferred_linear(x, module.weight.detach())
        return _DeferredWeightGrad.apply(x, self, module)

    def register(self, weight: nn.Parameter) -> None:
        """Make ``weight`` findable by the compiled path's backward op (`deferred_linear_grad_input`)."""
        if not any(w is weight for w in self.weights):
            self.weights.append(weight)
        _reindex()

    @staticmethod
    def stash_copy(x: torch.Tensor) -> torch.Tensor:
        """A private copy of ``x`` for the stash: a compiler may reuse the buffer (tensor object
        included) of a dead graph value for a later one, so the stash cannot hold the graph's own.
        One copy per deferred matmul: sharing one between wq/wk/wv (or w1/w3) would need a value
        check to rule out such a reuse, a host sync per matmul on CUDA, which the step forbids."""
        return x.detach().clone()

    def settle(self, weight: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> None:
        """A backward's (input, output-gradient) for ``weight``: stashed while an I runs, else summed now."""
        if self.capturing is None:
            self.accumulate(weight, x, g)
        else:
            self.pending[self.capturing].append((weight, x, g))


class _DeferredWeightGrad(torch.autograd.Function):
    """y = x Wᵀ whose weight gradient is left to a later W action.

    The weight reaches the function inside a module, not as a tensor argument, so autograd has no
    edge to it: no AccumulateGrad node runs for it during I (such a node would still fire
    post-accumulate-grad hooks, with no gradient, and confuse the data-parallel reducer). The
    weight's gradient is written by `WeightGradStore.flush` (or here, outside an I).
    """

    @staticmethod
    def forward(ctx, x, store, module):
        # an all-gathered sequence (sequence parallelism) is saved as this rank's shard and
        # re-gathered during I; the stash then holds the full sequence until W
        ctx.save_for_backward(save_matmul_input(ctx, x))
        # the Parameter itself, not a saved copy: under activation checkpointing saved tensors come
        # back as new tensor objects, and the deferred gradient must land on the real parameter
        ctx.weight = module.weight
        ctx.store = store
        return F.linear(x, module.weight)

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        x = unpack_matmul_input(ctx, saved)
        weight, store = ctx.weight, ctx.store
        grad_x = grad.matmul(weight.to(grad.dtype))
        store.settle(weight, x, grad)
        return grad_x, None, None


# -- the compiled path ---------------------------------------------------------------------------
# Inside a compiled block the autograd Function above cannot be traced: its backward appends to
# Python state chosen at run time (the I being captured). There the matmul is the custom op
# ``tandem::deferred_linear`` instead, opaque to the compiler, whose backward is the opaque op
# ``tandem::deferred_linear_grad_input``: it returns the input gradient and, at run time, hands
# (input, output-gradient) to the weight's store, exactly as `_DeferredWeightGrad.backward` does.
# The weight enters detached, so the compiled block has no autograd edge to it (no AccumulateGrad
# during I, as above); the backward op finds the Parameter and its store by the weight's storage
# address (`WeightGradStore.register`): custom ops take tensors, not Python objects, and a per-layer
# constant (an int id) would make every block a separate compile. An address is not an identity:
# storage moves after registration (ZeRO moves every parameter into its flat buffer) and a freed
# address is reused, so every hit is checked against the Parameter's current storage and shape, and
# a miss rebuilds the index from the live stores' registered Parameters.
_DEFERRED: dict[int, tuple[weakref.ref, weakref.ref]] = {}   # storage address -> (Parameter, its store)
_STORES: weakref.WeakSet = weakref.WeakSet()                 # every live WeightGradStore


def _reindex() -> None:
    _DEFERRED.clear()
    for store in list(_STORES):
        for w in store.weights:
            _DEFERRED[w.data_ptr()] = (weakref.ref(w), weakref.ref(store))


def _owner(weight: torch.Tensor):
    """The registered Parameter whose storage ``weight`` is, and its store (None, None if none is)."""
    for attempt in range(2):
        param, store = (r() for r in _DEFERRED.get(weight.data_ptr(), (lambda: None, lambda: None)))
        if (param is not None and store is not None and param.data_ptr() == weight.data_ptr()
                and param.shape == weight.shape):
            return param, store
        if attempt == 0:
            _reindex()   # storage moved (or a stale address was reused) since the index was built
    return None, None


@torch.library.custom_op("tandem::deferred_linear", mutates_args=())
def deferred_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x · weightᵀ whose weight gradient goes to the weight's `WeightGradStore` (in x's dtype: under
    autocast x arrives cast and the weight not)."""
    return F.linear(x, weight.to(x.dtype))


@deferred_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tandem::deferred_linear_grad_input", mutates_args=(),
                         tags=(torch._C.Tag.cudagraph_unsafe,) if hasattr(torch._C.Tag, "cudagraph_unsafe") else ())
def deferred_linear_grad_input(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    param, store = _owner(weight)
    if param is None:
        raise RuntimeError("a compiled block's deferred matmul has a weight that is not the storage of any Parameter "
                           "a live WeightGradStore registered (enable_weight_grad_deferral / "
                           "WeightGradStore.register); "
                           "register it, or run without train.compile")
    if store.capturing is None:   # summed now: nothing outlives this op
        store.settle(param, x.detach(), grad.detach())
    else:   # copies: the compiler may reuse the buffers of tensors it considers dead after this op
        store.settle(param, store.stash_copy(x), grad.detach().clone())
    return grad.matmul(weight.to(grad.dtype))


@deferred_linear_grad_input.register_fake
def _(grad, x, weight):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _deferred_setup(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _deferred_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return deferred_linear_grad_input(grad, x, weight), None


deferred_linear.register_autograd(_deferred_backward, setup_context=_deferred_setup)
# The grad-input op's effect (the stash) is not in its output: it must run once per call, exactly where
# the graph has it. So no dead-code elimination or common-subexpression merging of it, and no CUDA-graph
# capture of a graph containing it (a replay would run the kernels without the Python stash: the tag).
torch.fx.node.has_side_effect(torch.ops.tandem.deferred_linear_grad_input.default)


def enable_weight_grad_deferral(chunks: Sequence[nn.Module], store: WeightGradStore) -> None:
    """Point every deferrable x · Wᵀ of the chunks at ``store``.

    * `Linear`: its matmul (a bias, if any, is added outside and gets its gradient during I).
    * `ColumnParallelLinear` / `RowParallelLinear` (the output head under TP included): only their
      `matmul`; the tp mappings around it stay in the input-gradient path. The stash holds the
      matmul's input: the all-gathered sequence under sequence parallelism (column-parallel;
      saved as the local shard between F and I and re-gathered during I), the local hidden shard
      (row-parallel), kept until W.
    * the tied head (`Llama.tied_head`) of a last stage that is not also a first stage: there its
      embedding copy has no other use, and `sync_tied_grads` runs after the step's last W. A chunk
      that also looks up embeddings with the weight keeps it undeferred: the lookup's gradient
      would still accumulate during I, and the data-parallel reducer, counting those accumulations,
      would send the weight's gradient before the W's had been added.
    """
    for chunk in chunks:
        for mod in chunk.modules():
            if isinstance(mod, (Linear, ColumnParallelLinear, RowParallelLinear)):
                mod.weight_grad_store = store
                store.register(mod.weight)
                # for the data-parallel reducer: a compiled block's backward fires this weight's
                # post-accumulate-grad hook with no gradient (it is an input of the compiled graph,
                # detached inside it); the reducer must not count that as the weight's gradient
                mod.weight.weight_grad_deferred = True
        cfg = getattr(chunk, "cfg", None)
        if cfg is not None and cfg.tie_embeddings and chunk.is_last and not chunk.is_first:
            chunk.weight_grad_store = store
