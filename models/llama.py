"""A Llama-3-style decoder for one device: RMSNorm, rotary embeddings, GQA, SwiGLU.

The model can be built for a contiguous range of layers (a pipeline stage): the token embedding
lives on the first stage, the final norm and output head on the last (by default the stages
holding layer 0 and the last layer; ``first=`` / ``last=`` say so explicitly, which an empty end
stage needs: ``layers=(0, 0), first=True`` holds only the embedding, ``layers=(L, L), last=True``
only the head and the loss). Layers sit in a ModuleDict keyed by their global index, so parameter names are the same in
every layout (``layers.7.attention.wq.weight`` is that weight on any stage, in any checkpoint).

With tied embeddings the output head reuses ``tok_embeddings.weight``. A last stage that does not
hold the first layer keeps its own copy under that same name; the pipeline engine adds the two
copies' gradients.

Two execution choices are declared state of the modules, set by one function each and read by
the forwards, so nothing replaces a method and the order of applying them does not matter:

* ``recompute`` (TransformerBlock, Attention, FeedForward; set by `engine.recompute.apply_recompute`):
  ``full`` runs the whole block inside an activation checkpoint, ``selective`` only the attention
  body. `Attention.checkpointed` / `FeedForward.checkpointed` say whether a part runs inside one
  (tensor parallelism reads that to decide the sequence-parallel re-gather).
* ``weight_grad_store`` (`Linear`, the tensor-parallel linears, `Llama` for its tied head; set by
  `engine.pipeline.weight_grad.enable_weight_grad_deferral`): None is plain autograd; a store
  computes ``x · Wᵀ`` itself and leaves the weight gradient to the pipeline's W action.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import Ops, get_ops, rope_cos_sin
from models.config import ModelConfig

RECOMPUTE_MODES = ("none", "selective", "full")


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and names) whose ``x · Wᵀ`` a zero-bubble pipeline can defer:
    with a ``weight_grad_store`` the store computes it and takes over the weight gradient; a bias,
    if any, is added here and gets its (cheap) gradient at once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.weight_grad_store = None

    def forward(self, x):
        if self.weight_grad_store is None:
            return super().forward(x)
        y = self.weight_grad_store.matmul(self, x)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x, residual=None):
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` in one fused op.

        Under autocast the sub-layer output ``x`` is bf16 while the residual stream stays float32;
        the fused kernel wants one dtype, so both go to the promoted one first, which is exactly
        what ``x + residual`` computes (the upcast is exact and the sum is rounded once)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        if x.dtype != residual.dtype:
            dtype = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dtype), residual.to(dtype)
        return self.ops.rms_norm(x, self.weight, self.eps, residual=residual)


class RopeTables:
    """The rotary cos/sin tables of one model, built on first use for each (seq_len, device, dtype)
    and then shared by all its attention layers and micro-batches (not module buffers: they are a
    function of the config, never saved, and follow the input's device by their key)."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, seq_len: int, device: torch.device, dtype: torch.dtype = torch.float32):
        key = (seq_len, device, dtype)
        if key not in self.tables:
            with torch.no_grad():
                self.tables[key] = rope_cos_sin(seq_len, self.head_dim, self.theta, device=device, dtype=dtype)
        return self.tables[key]


class Attention(nn.Module):
    """Grouped-query attention. Head counts are read off the projection shapes, so the same code
    runs on a tensor-parallel shard holding a subset of the heads."""

    def __init__(self, cfg: ModelConfig, ops: Ops, rope: RopeTables | None = None):
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.rope_theta = cfg.rope_theta
        self.rope = rope if rope is not None else RopeTables(hd, cfg.rope_theta)
        self.ops = ops
        self.wq = Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.recompute = "none"

    @property
    def checkpointed(self) -> bool:
        """Whether this forward runs inside an activation checkpoint (its own under ``selective``,
        the block's under ``full``)."""
        return self.recompute != "none"

    def forward(self, x):
        # only the body is checkpointed: hooks around the module (the tensor-parallel entry
        # mapping) run once, outside, as their collectives must not be repeated in backward
        if self.recompute == "selective":
            return checkpoint(self._attend, x, use_reentrant=False)
        return self._attend(x)

    def _attend(self, x):
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, -1, hd)  # (B, T, n_heads, hd)
        k = self.wk(x).view(B, T, -1, hd)  # (B, T, n_kv_heads, hd)
        v = self.wv(x).view(B, T, -1, hd)
        cos, sin = self.rope.get(T, x.device)
        q = self.ops.apply_rotary(q, cos, sin)
        k = self.ops.apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.ops = ops
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.recompute = "none"

    @property
    def checkpointed(self) -> bool:
        """Whether this forward runs inside an activation checkpoint (the block's, under ``full``)."""
        return self.recompute == "full"

    def forward(self, x):
        return self.w2(self.ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, rope: RopeTables | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.attention = Attention(cfg, ops, rope)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.feed_forward = FeedForward(cfg, ops)
        self.recompute = "none"

    def forward(self, x):
        if self.recompute == "full":
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)

    def _block(self, x):
        # h = x + attention(...) and ffn_norm(h) in one fused residual RMSNorm (x + a == a + x
        # exactly, so this is the textbook block bit for bit on the torch path). The block still
        # takes and returns the plain hidden state: pipeline stages and recompute wrap whole blocks.
        normed, h = self.ffn_norm(self.attention(self.attention_norm(x)), residual=x)
        return h + self.feed_forward(normed)


class CrossEntropy(nn.Module):
    """Mean next-token loss. A module so tensor parallelism can swap in the vocab-parallel one."""

    def __init__(self, ops: Ops):
        super().__init__()
        self.ops = ops

    def forward(self, logits, targets):
        return self.ops.cross_entropy(logits, targets)


class Llama(nn.Module):
    """The decoder, or the stage of it holding global layers ``layers=(start, stop)``.

    ``forward(x, targets=None)``: ``x`` is token ids (B, T) on the first stage and the hidden
    state (B, T, dim) elsewhere. The last stage returns the mean loss when ``targets`` is given,
    else the logits; other stages return the hidden state.
    """

    def __init__(self, cfg: ModelConfig, *, layers: tuple[int, int] | None = None, kernels: str = "torch",
                 first: bool | None = None, last: bool | None = None):
        super().__init__()
        start, stop = layers if layers is not None else (0, cfg.n_layers)
        if not 0 <= start <= stop <= cfg.n_layers:
            raise ValueError(f"layer range {(start, stop)} is outside 0..{cfg.n_layers}")
        # the ends of the pipeline: by default the stage holding layer 0 / the last layer; a layout
        # with an empty end stage ((0, 0) embedding only, (L, L) head only) must say which stage is
        # which, since the stage next to it starts at 0 / stops at L too
        first = start == 0 if first is None else first
        last = stop == cfg.n_layers if last is None else last
        if (first and start != 0) or (last and stop != cfg.n_layers):
            raise ValueError(f"layer range {(start, stop)} cannot be the {'first' if first and start else 'last'} "
                             f"stage: the first stage starts at layer 0, the last stops at {cfg.n_layers}")
        self.cfg = cfg
        self.layer_range = (start, stop)
        self.is_first = first
        self.is_last = last
        ops = get_ops(kernels)
        self.ops = ops
        if self.is_first or (self.is_last and cfg.tie_embeddings):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        rope = RopeTables(cfg.head_dim, cfg.rope_theta)  # one set of position tables for all the layers
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, ops, rope) for i in range(start, stop)})
        if self.is_last:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
            if not cfg.tie_embeddings:
                self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.loss_fn = CrossEntropy(ops)
        self.weight_grad_store = None  # for the tied head (see the module docstring)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.cfg.tie_embeddings else self.output.weight

    def logits(self, h):
        """Final norm and output projection. h: (B, T, dim) -> (B, T, vocab)."""
        h = self.norm(h)
        return self.output(h) if not self.cfg.tie_embeddings else self.tied_head(h)

    def tied_head(self, h):
        """h · tok_embeddings.weightᵀ: the tied output projection. With a ``weight_grad_store``
        (zero-bubble, on a last stage that is not also first) its weight gradient waits for W."""
        if self.weight_grad_store is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.weight_grad_store.matmul(self.tok_embeddings, h)

    def forward(self, x, targets=None):
        h = self.tok_embeddings(x) if self.is_first else x
        for layer in self.layers.values():
            h = layer(h)
        if not self.is_last:
            return h
        logits = self.logits(h)
        if targets is None:
            return logits
        return self.loss_fn(logits, targets)
