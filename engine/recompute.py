"""Activation recomputation: which parts of each transformer block keep their activations.

``none`` keeps everything; ``full`` keeps only each block's input and recomputes the block in
backward; ``selective`` recomputes only the attention body (the part with the largest activations
per FLOP). The mode is declared state of the blocks (`models.llama.TransformerBlock.recompute` and
its attention's and MLP's), read by their forwards, which run `torch.utils.checkpoint` with
``use_reentrant=False``; parameter names do not change.

Under sequence parallelism a part running inside a checkpoint (its ``checkpointed``) keeps the
all-gathered input instead of saving the local shard and re-gathering it in backward
(`engine.tensor_parallel.SeqShard`): full recompute gathers the sequence again anyway, and the
attention's checkpoint keeps its gathered input for the recomputation. That follows from the mode
at forward time, so applying recompute before or after `parallelize` is the same.
"""
from __future__ import annotations

from torch import nn

from models.llama import RECOMPUTE_MODES


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Set ``mode`` (none | selective | full) on every block of ``model`` (a `Llama` or a stage of it)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"parallel.recompute={mode!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    for block in model.layers.values():
        block.recompute = block.attention.recompute = block.feed_forward.recompute = mode
