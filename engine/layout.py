"""Where the model's pieces live across ranks: the rules the trainer, the planner, the optimizer,
checkpointing and the converter share, so that none of them can disagree with another.

Plain arithmetic on names and counts (no tensors, no process groups), so the planner and the
converter use the same rule as the pipeline runtime without importing it.
"""
from __future__ import annotations

from typing import Hashable, Sequence


def even_split(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage, as even as possible; earlier stages take the remainder (the last stage
    also carries the output head and the loss)."""
    base, extra = divmod(n_layers, n_stages)
    return [base + (s < extra) for s in range(n_stages)]


def check_end_only_empty(counts: Sequence[int], what: str) -> None:
    """Raise ValueError unless every stage's layer count is ≥ 1, except the first stage's (which
    then holds only the token embedding) and the last's (only the final norm, head and loss), which
    may be 0: Megatron's --pipeline-model-parallel-layout, Llama 3's lighter end stages. ``what``
    names the setting in the message (parallel.layers_per_stage, --layers-per-stage)."""
    counts = list(counts)
    if any(c < 0 for c in counts):
        raise ValueError(f"{what}={counts} has a negative count; give every stage 0 or more layers")
    empty = [s for s, c in enumerate(counts[1:-1], start=1) if c == 0]
    if empty:
        raise ValueError(f"{what}={counts} gives stage{'s' if len(empty) > 1 else ''} "
                         f"{', '.join(map(str, empty))} no layers; only the first stage (embedding only) and the "
                         f"last (head and loss only) may hold none, so move a layer into every middle stage")


def stage_bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) of every stage's contiguous layers, from its layer count."""
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def lowest_holders(held: Sequence[Sequence[Hashable]]) -> dict[Hashable, int]:
    """For every item some rank holds (``held[rank]``: that rank's items, e.g. (key, offset,
    shape) regions), the lowest rank holding it: the one that writes it to a checkpoint and counts
    it in the gradient norm, so a region several ranks hold is written and counted once."""
    first: dict[Hashable, int] = {}
    for rank, items in enumerate(held):
        for item in items:
            first.setdefault(item, rank)
    return first


PLACEMENTS = ("loop", "v")


def stage_rank(stage: int, pp: int, placement: str = "loop") -> int:
    """The pp rank that holds global stage ``stage``.

    ``loop`` (round robin, Megatron's interleaving): stage s on rank s % pp, so every micro-batch
    visits the ranks in order, v times. ``v`` (ZB-V, DualPipeV): two chunks per rank in a V, rank r
    holds stages r and 2p - 1 - r, so the turn at the last rank and the loss at rank 0 hand over in
    memory instead of over the wire."""
    if placement == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(rank: int, pp: int, chunks: int, placement: str = "loop") -> list[int]:
    """The global stages ``rank`` holds, in local chunk order (chunk c is stage ``rank_stages(...)[c]``;
    in both placements a stage's chunk index is stage // pp)."""
    if placement == "v":
        if chunks != 2:
            raise ValueError(f"the V placement holds exactly two chunks per rank, not {chunks}")
        return [rank, 2 * pp - 1 - rank]
    return [c * pp + rank for c in range(chunks)]
