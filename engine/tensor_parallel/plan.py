"""The tensor-parallel plan: one table saying how every parameter of a `Llama` is laid out over tp.

`PLAN` maps module paths (``fnmatch`` patterns over the global names) to a `Rule`: a sharding
`Style` and the model-config field counting the units it splits. Everything that needs the layout
reads it here — `parallelize` (which module becomes which parallel layer), `sync_tp_grads` (which
gradients are summed over tp) and the checkpoint converter (which slice each tp rank's file
holds) — through `param_shard`, so the trainer and the converter cannot disagree. `validate_tp`
collects the table's own divisibility rules into one launch error. `ENTRIES` says where the
activations enter the tensor-parallel region.

- attention: wq column-parallel by heads, wo row-parallel; wk, wv split by KV heads when tp divides
  ``n_kv_heads``, otherwise (tp a multiple of ``n_kv_heads``) each rank holds the one KV head its
  query heads use, and the ranks sharing a KV head add their gradients (`GradSync.KV_REPLICA`).
- MLP: w1 (gate), w3 (up) column-parallel, w2 (down) row-parallel.
- the token embedding and an untied output head: vocabulary rows, padded to a multiple of tp
  (Megatron's make-vocab-size-divisible-by); the padding rows are local only, not part of the
  global tensor.
- the RMSNorm gains: whole on every rank; under sequence parallelism each rank's gradient covers
  its T/tp positions only, so they are summed over tp (`GradSync.PARTIAL`).
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from enum import Enum

from models.config import ModelConfig
from models.shard import ShardMeta


class Style(Enum):
    """How a module's weight is laid out over the tp ranks."""

    COLUMN = "column"  # split by output rows (dim 0)
    ROW = "row"  # split by input columns (dim 1)
    KV_HEADS = "kv_heads"  # by KV heads (dim 0); one head on tp / n_kv_heads ranks when tp > n_kv_heads
    VOCAB = "vocab"  # by vocabulary rows (dim 0), padded to a multiple of tp
    SEQ_REPLICATED = "seq_replicated"  # whole everywhere; under sequence parallelism a partial gradient


class GradSync(Enum):
    """Why a gradient must be summed over tp after backward."""

    PARTIAL = "partial"  # each rank saw its part of the sequence (sequence-parallel norms)
    KV_REPLICA = "kv_replica"  # the ranks sharing a KV head each saw their own query heads


@dataclass(frozen=True)
class Rule:
    """One row of the plan: the style, and what it splits (its divisibility rule names this key)."""

    style: Style
    count: str | None = None  # the ModelConfig field counting the units split: heads, features, vocab rows


PLAN: dict[str, Rule] = {
    "tok_embeddings": Rule(Style.VOCAB, "vocab_size"),
    "layers.*.attention_norm": Rule(Style.SEQ_REPLICATED),
    "layers.*.attention.wq": Rule(Style.COLUMN, "n_heads"),
    "layers.*.attention.wk": Rule(Style.KV_HEADS, "n_kv_heads"),
    "layers.*.attention.wv": Rule(Style.KV_HEADS, "n_kv_heads"),
    "layers.*.attention.wo": Rule(Style.ROW, "n_heads"),
    "layers.*.ffn_norm": Rule(Style.SEQ_REPLICATED),
    "layers.*.feed_forward.w1": Rule(Style.COLUMN, "ffn_dim"),
    "layers.*.feed_forward.w3": Rule(Style.COLUMN, "ffn_dim"),
    "layers.*.feed_forward.w2": Rule(Style.ROW, "ffn_dim"),
    "norm": Rule(Style.SEQ_REPLICATED),
    "output": Rule(Style.VOCAB, "vocab_size"),
}


class Entry(Enum):
    """Where activations enter the tensor-parallel region (the mapping ``f``, applied once for all the
    column-parallel layers that read them)."""

    INPUT = "input"  # the module's input: shared by q/k/v, or by gate/up
    OUTPUT = "output"  # the module's output: the final norm's, read by the vocab-parallel head


ENTRIES: dict[str, Entry] = {
    "layers.*.attention": Entry.INPUT,
    "layers.*.feed_forward": Entry.INPUT,
    "norm": Entry.OUTPUT,
}


@dataclass(frozen=True)
class TPLayout:
    """What `parallelize` applied to a model (kept on it as ``model.tp_layout``)."""

    tp: int
    tp_rank: int
    sequence_parallel: bool


@dataclass(frozen=True)
class TPShard:
    """One rank's part of a global parameter: ``meta`` the region of the global tensor it holds
    (padding excluded), ``local_shape`` the local tensor (vocabulary padding rows included), and
    the gradient sync it needs, if any."""

    meta: ShardMeta
    local_shape: tuple[int, ...]
    grad_sync: GradSync | None = None


@functools.lru_cache(maxsize=None)  # read for every parameter at every step by `sync_tp_grads`
def rule_of(module_path: str) -> Rule | None:
    """The plan's rule for the module at ``module_path`` (e.g. ``layers.3.attention.wq``), or None."""
    found = [rule for pattern, rule in PLAN.items() if fnmatch.fnmatchcase(module_path, pattern)]
    return found[0] if found else None


def entry_of(module_path: str) -> Entry | None:
    """Whether activations enter the tensor-parallel region at the module at ``module_path``."""
    found = [entry for pattern, entry in ENTRIES.items() if fnmatch.fnmatchcase(module_path, pattern)]
    return found[0] if found else None


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so every rank holds an equal shard."""
    return -(-vocab_size // tp) * tp


def vocab_shard(vocab_size: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(first id, local rows, real rows) of ``rank``'s vocabulary shard. Padding rows (local - real)
    sit at the end of the last shard(s); they are not part of the global tensor, stay zero, and
    their logits are masked before the loss."""
    local = padded_vocab(vocab_size, tp) // tp
    start = rank * local
    real = max(0, min(vocab_size - start, local))
    return start, local, real


def kv_rows(mcfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of wk / wv on ``rank``: a 1/tp split of the KV heads, or, when tp is a
    multiple of n_kv_heads, the single KV head this rank's query heads attend with."""
    hd = mcfg.head_dim
    if mcfg.n_kv_heads % tp == 0:
        per = mcfg.n_kv_heads // tp
        return rank * per * hd, per * hd
    if tp % mcfg.n_kv_heads:
        raise ValueError(_problem(Rule(Style.KV_HEADS, "n_kv_heads"), mcfg, tp))
    return (rank // (tp // mcfg.n_kv_heads)) * hd, hd


def _box(global_shape, dim: int, offset: int, rows: int, local: int | None = None,
         grad_sync: GradSync | None = None) -> TPShard:
    """The shard holding ``rows`` of ``global_shape`` from ``offset`` on ``dim`` (``local`` with padding)."""
    start, shape, local_shape = [0] * len(global_shape), list(global_shape), list(global_shape)
    start[dim], shape[dim], local_shape[dim] = offset, rows, rows if local is None else local
    return TPShard(ShardMeta(tuple(global_shape), tuple(start), tuple(shape)), tuple(local_shape), grad_sync)


def even_shard(global_shape, dim: int, tp: int, rank: int) -> TPShard:
    """Rank ``rank``'s 1/tp of ``global_shape`` along ``dim`` (column: dim 0, row: dim 1)."""
    n = global_shape[dim]
    if n % tp:
        raise ValueError(f"{'output' if dim == 0 else 'input'} features {n} are not divisible by tp={tp}")
    return _box(global_shape, dim, rank * (n // tp), n // tp)


def vocab_rows(global_shape, tp: int, rank: int) -> TPShard:
    """Rank ``rank``'s vocabulary rows of a (vocab, dim) tensor, padded to a multiple of tp locally."""
    start, local, real = vocab_shard(global_shape[0], tp, rank)
    return _box(global_shape, 0, min(start, global_shape[0]), real, local)


def _problem(rule: Rule, mcfg: ModelConfig, tp: int) -> str | None:
    """Why ``rule`` cannot split ``mcfg`` over ``tp`` ranks (naming the config keys), or None."""
    if rule.count is None:
        return None
    n = getattr(mcfg, rule.count)
    if rule.style is Style.KV_HEADS:
        if n % tp and tp % n:
            return (f"parallel.tp={tp} neither divides model.{rule.count}={n} (to split the KV heads) nor is a "
                    f"multiple of it (to replicate each KV head on tp/n_kv_heads ranks), so some rank's query "
                    f"heads would need two KV heads")
    elif rule.style is Style.VOCAB:
        if n < tp:
            return f"model.{rule.count}={n} is smaller than parallel.tp={tp}"
    elif n % tp:
        return f"parallel.tp={tp} does not divide model.{rule.count}={n}"
    return None


def param_shard(name: str, global_shape, mcfg: ModelConfig, tp: int, tp_rank: int, *,
                sequence_parallel: bool = False) -> TPShard:
    """What tp rank ``tp_rank`` holds of the global parameter ``name`` (shape ``global_shape``), by the plan."""
    global_shape = tuple(global_shape)
    rule = rule_of(name.rpartition(".")[0])
    full = ShardMeta.full(global_shape)
    if rule is None or tp == 1:
        return TPShard(full, full.shape)
    if rule.style is Style.SEQ_REPLICATED:
        return TPShard(full, full.shape, GradSync.PARTIAL if sequence_parallel else None)
    problem = _problem(rule, mcfg, tp)
    if problem:
        raise ValueError(f"cannot shard {name}: {problem}")
    if rule.style is Style.VOCAB:
        return vocab_rows(global_shape, tp, tp_rank)
    if rule.style is Style.KV_HEADS:
        lo, rows = kv_rows(mcfg, tp, tp_rank)
        return _box(global_shape, 0, lo, rows, grad_sync=GradSync.KV_REPLICA if mcfg.n_kv_heads % tp else None)
    return even_shard(global_shape, 0 if rule.style is Style.COLUMN else 1, tp, tp_rank)


def validate_tp(mcfg: ModelConfig, tp: int, *, seq_len: int | None = None, sequence_parallel: bool = False) -> None:
    """Every reason a model cannot be split over ``tp`` ranks, as one error naming keys and fixes."""
    if tp < 1:
        raise ValueError(f"parallel.tp={tp} must be at least 1")
    problems = list(dict.fromkeys(p for rule in PLAN.values() if (p := _problem(rule, mcfg, tp))))
    if sequence_parallel and seq_len is not None and seq_len % tp:
        problems.append(f"train.seq_len={seq_len} is not divisible by parallel.tp={tp} "
                        f"(parallel.sequence_parallel=true splits the sequence)")
    if problems:
        raise ValueError("cannot shard the model over tensor-parallel ranks: " + "; ".join(problems)
                         + "; choose a parallel.tp that divides them (or change the model shape)")
