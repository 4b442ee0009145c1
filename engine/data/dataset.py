"""Reading prepared data: `TokenData` (one directory, checked on open) and `DataMix` (the training
stream over one or several directories in fixed proportions).

The sequences of step ``s`` are a pure function of ``(seed, s)``: sample ``i`` of the run
(``s·B ≤ i < (s+1)·B``) is mapped to a source by a fixed blending pattern, then to a window of that
source by a seeded permutation of its windows for the epoch the sample falls in. So a run visits every
window once per epoch (no repeats), every layout and every resume sees the same tokens, and nothing
but the step needs to be checkpointed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from engine.data.errors import DataError
from engine.data.prepare import FORMAT, is_prepared, read_meta, tokenizer_hash

BLEND_PERIOD = 4096  # samples in one repetition of the blending pattern


class TokenStream:
    """A split's flat token stream over its shards (memory-mapped); ``read(a, b)`` spans shards."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, a: int, b: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, a, side="right")) - 1
        parts = []
        while a < b:
            lo = a - int(self.offsets[k])
            take = min(b - a, len(self.arrays[k]) - lo)
            parts.append(np.asarray(self.arrays[k][lo:lo + take], dtype=np.int64))
            a, k = a + take, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TokenData:
    """A prepared data directory, memory-mapped, checked on open: files present, sizes as meta.json
    says, ids below the vocabulary. Every check that can fail runs here, when every rank opens the
    directory, never on a read: a rank reads only its slice of a batch, so an error raised while
    reading would stop some ranks and leave the others waiting in the next collective."""

    def __init__(self, data_dir: str | Path, *, vocab_size: int | None = None):
        d = Path(data_dir)
        if not is_prepared(d):
            raise DataError(f"{str(d)!r} is not a prepared data directory (no meta.json); run "
                            f"`python scripts/prepare_data.py data.dir={d}` or point data.dir at one")
        self.dir, self.meta = d, read_meta(d)
        if vocab_size is not None and self.meta["vocab_size"] != vocab_size:
            raise DataError(
                f"the tokenizer in {str(d)!r} has vocab size {self.meta['vocab_size']} but model.vocab_size is "
                f"{vocab_size}; set model.vocab_size={self.meta['vocab_size']} or use another data.dir")
        self.dtype = np.dtype(self.meta["dtype"])
        self.train, self.val = (TokenStream(self._open_split(name)) for name in ("train", "val"))
        self.tokenizer_sha256 = tokenizer_hash(d)

    def _open_split(self, name: str) -> list[np.ndarray]:
        fmt = self.meta.get("format", "tandem-data/1")
        if fmt == "tandem-data/1":  # one flat file per split, no document index and no recorded max_id
            arrays = [self._open_shard({"file": f"{name}.bin", "tokens": self.meta[f"{name}_tokens"]})]
            self._check_max_id(name, max_token_id(arrays, self.meta["vocab_size"]))
            return arrays
        if fmt == FORMAT:
            split = self.meta["splits"][name]
            self._check_max_id(name, split["max_id"])   # recorded at prepare time: no scan
            return [self._open_shard(s) for s in split["shards"]]
        raise DataError(f"{str(self.dir)!r} has data format {fmt!r}, which this version does not read "
                        f"(it reads tandem-data/1 and {FORMAT}); prepare the corpus again")

    def _check_max_id(self, name: str, max_id: int | None) -> None:
        if max_id is not None and max_id >= self.meta["vocab_size"]:
            raise DataError(f"{self.dir}/{name}: token id {max_id} is not below the vocabulary size "
                            f"{self.meta['vocab_size']}; the directory is corrupt, prepare it again")

    def _open_shard(self, shard: dict) -> np.ndarray:
        f = self.dir / shard["file"]
        want = shard["tokens"] * self.dtype.itemsize
        if not f.is_file():
            raise DataError(f"{f} is missing; the prepared directory is incomplete, prepare it again")
        if f.stat().st_size != want:
            raise DataError(f"{f} holds {f.stat().st_size} bytes but meta.json says {shard['tokens']} tokens "
                            f"({want} bytes); the file is truncated or replaced, prepare the directory again")
        return np.memmap(f, dtype=self.dtype, mode="r") if want else np.zeros(0, self.dtype)

    def window_rows(self, stream: TokenStream, starts, seq_len: int) -> np.ndarray:
        """The windows [start, start + T + 1) as a (B, T + 1) int64 array (ids were checked on open)."""
        return np.stack([stream.read(s, s + seq_len + 1) for s in starts])

    def windows(self, stream: TokenStream, starts, seq_len: int):
        """(inputs, targets), each (B, T) int64, of the windows [start, start + T + 1)."""
        w = torch.from_numpy(self.window_rows(stream, starts, seq_len))
        return w[:, :-1], w[:, 1:]

    def n_windows(self, seq_len: int) -> int:
        """Training windows of ``seq_len + 1`` tokens, window i starting at token i·T (they share one
        token at each boundary: the last target of one is the first input of the next)."""
        return max((len(self.train) - 1) // seq_len, 0)

    def eval_windows(self, first: int, count: int, *, seq_len: int):
        """Windows ``first .. first+count-1`` of the validation tokens; window i is tokens [i·T, (i+1)·T + 1)."""
        w = self.eval_rows(first, count, seq_len=seq_len)
        return w[:, :-1], w[:, 1:]

    def check_eval(self, windows: int, *, seq_len: int) -> None:
        """The val split holds ``windows`` evaluation windows. Called at launch on every rank with the
        whole evaluation's count (eval.batches × global batch): a rank reads only its slice, so a bound
        checked per read would fail on some ranks only and leave the others waiting."""
        need = windows * seq_len + 1
        if need > len(self.val):
            raise DataError(f"the val split in {str(self.dir)!r} has {len(self.val)} tokens but eval needs {need} "
                            f"({windows} windows of train.seq_len={seq_len}); lower eval.batches or "
                            f"train.global_batch_size, or prepare a larger corpus")

    def eval_rows(self, first: int, count: int, *, seq_len: int) -> torch.Tensor:
        """The same windows as one (count, T + 1) tensor: inputs are [:, :-1], targets [:, 1:]."""
        self.check_eval(first + count, seq_len=seq_len)   # a direct caller's guard; a launch checked it all
        return torch.from_numpy(self.window_rows(self.val, [i * seq_len for i in range(first, first + count)], seq_len))


def max_token_id(arrays: list[np.ndarray], vocab_size: int, chunk: int = 1 << 24) -> int | None:
    """The largest id in memory-mapped ``arrays`` (for data without a recorded ``max_id``), read in
    chunks so memory stays bounded; None when the dtype cannot hold an id as large as ``vocab_size``
    (then no scan is needed)."""
    if not arrays or np.iinfo(arrays[0].dtype).max < vocab_size:
        return None
    out = -1
    for a in arrays:
        for i in range(0, len(a), chunk):
            out = max(out, int(a[i:i + chunk].max()))
    return out


# -- sampling without replacement -------------------------------------------------------------------
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit hash (splitmix64 finalizer) of ``x`` under ``key``; wraps mod 2^64 by design."""
    x = (x ^ np.uint64(key)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: bytes) -> np.ndarray:
    """Position ``index`` of a pseudo-random permutation of ``range(n)`` chosen by ``key``: a 4-round
    Feistel network on the smallest even number of bits covering n, cycle-walking out-of-range values
    back in (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002). O(1) memory for any n."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [int.from_bytes(key[8 * r:8 * r + 8], "little") for r in range(4)]
    x = index.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            left, right = x[todo] >> np.uint64(half), x[todo] & mask
            for k in keys:
                left, right = right, left ^ (_mix(right, k) & mask)
            x[todo] = (left << np.uint64(half)) | right
            todo &= x >= np.uint64(n)
    return x.astype(np.int64)


def epoch_key(seed: int, source: int, epoch: int) -> bytes:
    return hashlib.sha256(f"tandem-data/{seed}/{source}/{epoch}".encode()).digest()


def blend_pattern(weights: list[float], period: int = BLEND_PERIOD) -> np.ndarray:
    """The source of each sample in one period: Megatron-LM's blended dataset rule (each sample goes to
    the source furthest behind its share, ``w_d·(i+1) − count_d``), repeated every ``period`` samples
    so that sample i's source and its index within that source have a closed form."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(w))
    pattern = np.empty(period, dtype=np.int64)
    for i in range(period):
        d = int(np.argmax(w * (i + 1) - counts))
        pattern[i] = d
        counts[d] += 1
    return pattern


class DataMix:
    """The training stream over one or several prepared directories; evaluation reads the first one's
    validation split. ``weights`` must be positive and match ``sources`` in number."""

    def __init__(self, sources: list[TokenData], weights: list[float] | None = None):
        weights = list(weights) if weights else [1.0] * len(sources)
        self.sources, self.weights = sources, weights
        self.pattern = blend_pattern(weights)
        self.per_period = np.bincount(self.pattern, minlength=len(sources))  # samples of each source per period
        # within a period: how many samples of the same source come before position r
        self.rank_in_period = np.zeros(BLEND_PERIOD, dtype=np.int64)
        for d in range(len(sources)):
            at = self.pattern == d
            self.rank_in_period[at] = np.arange(int(at.sum()))

    @property
    def first(self) -> TokenData:
        return self.sources[0]

    def eval_windows(self, first: int, count: int, *, seq_len: int):
        return self.first.eval_windows(first, count, seq_len=seq_len)

    def eval_rows(self, first: int, count: int, *, seq_len: int) -> torch.Tensor:
        return self.first.eval_rows(first, count, seq_len=seq_len)

    def check_eval(self, batches: int, *, batch_size: int, seq_len: int) -> None:
        """Evaluation (``batches`` global batches of the first source's val split) fits; see TokenData."""
        self.first.check_eval(batches * batch_size, seq_len=seq_len)

    def _locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample index -> (source, index of the sample among that source's samples)."""
        period, r = np.divmod(samples, BLEND_PERIOD)
        src = self.pattern[r]
        return src, period * self.per_period[src] + self.rank_in_period[r]

    def train_batch(self, step: int, *, seed: int, batch_size: int, seq_len: int):
        """The ``batch_size`` sequences of optimizer step ``step``: (inputs, targets), each (B, T) int64."""
        w = self.train_rows(step, seed=seed, batch_size=batch_size, seq_len=seq_len)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def train_rows(self, step: int, *, seed: int, batch_size: int, seq_len: int, first: int = 0,
                   count: int | None = None) -> torch.Tensor:
        """Rows ``first .. first+count-1`` of step ``step``'s batch of ``batch_size`` as one
        (count, T + 1) int64 tensor (inputs [:, :-1], targets [:, 1:]). A row depends only on its
        sample index, so a dp rank reads its own slice and gets exactly those rows of the whole batch."""
        count = batch_size - first if count is None else count
        if not (0 <= first and first + count <= batch_size):
            raise ValueError(f"rows {first}..{first + count - 1} are outside a batch of {batch_size}")
        samples = np.arange(step * batch_size + first, step * batch_size + first + count, dtype=np.int64)
        src, j = self._locate(samples)
        w = np.empty((count, seq_len + 1), dtype=np.int64)
        for d in np.unique(src):
            rows = np.nonzero(src == d)[0]
            starts = self._window_starts(int(d), j[rows], seed=seed, seq_len=seq_len)
            w[rows] = self.sources[d].window_rows(self.sources[d].train, starts, seq_len)
        return torch.from_numpy(w)

    def _window_starts(self, d: int, j: np.ndarray, *, seed: int, seq_len: int) -> list[int]:
        n = self._n_windows(d, seq_len)
        epoch, pos = np.divmod(j, n)
        out = np.empty_like(j)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = permute(pos[at], n, epoch_key(seed, d, int(e)))
        return (out * seq_len).tolist()

    def _n_windows(self, d: int, seq_len: int) -> int:
        n = self.sources[d].n_windows(seq_len)
        if n < 1:
            raise DataError(f"the train split in {str(self.sources[d].dir)!r} has {len(self.sources[d].train)} "
                            f"tokens, fewer than train.seq_len+1={seq_len + 1}; use a larger corpus or a shorter "
                            f"train.seq_len")
        return n

    def position(self, samples_done: int, seq_len: int) -> dict:
        """Progress after ``samples_done`` samples: ``epoch`` (passes over the training windows; for a
        blend, the most-repeated source's) and ``source_epochs`` for a blend."""
        period, r = divmod(samples_done, BLEND_PERIOD)
        taken = period * self.per_period + np.bincount(self.pattern[:r], minlength=len(self.sources))
        epochs = [float(taken[d]) / self._n_windows(d, seq_len) for d in range(len(self.sources))]
        out = {"epoch": round(max(epochs), 6)}
        if len(self.sources) > 1:
            out["source_epochs"] = [round(e, 6) for e in epochs]
        return out


def open_sources(dirs: list[str], weights: list[float] | None, *, vocab_size: int | None) -> DataMix:
    """``data.sources`` (or ``[data.dir]``) with ``data.weights``, checked: weights match and are
    positive, every directory is prepared, and all share one tokenizer."""
    if weights is not None and len(weights) != len(dirs):
        raise DataError(f"data.weights has {len(weights)} entries but data.sources has {len(dirs)}; give one "
                        f"weight per source")
    if weights is not None and any(not w > 0 for w in weights):
        raise DataError(f"data.weights={list(weights)} must all be positive; drop a source instead of weighting "
                        f"it 0")
    data = [TokenData(d, vocab_size=vocab_size) for d in dirs]
    for other in data[1:]:
        if other.tokenizer_sha256 != data[0].tokenizer_sha256:
            raise DataError(f"data.sources {str(data[0].dir)!r} and {str(other.dir)!r} were prepared with different "
                            f"tokenizers; prepare every source with the same data.tokenizer")
    mix = DataMix(data, weights)
    small = [d for d, c in enumerate(mix.per_period) if c == 0]
    if small:
        raise DataError(f"data.weights: source {dirs[small[0]]!r} gets no sample in {BLEND_PERIOD} "
                        f"(weight {mix.weights[small[0]]}); raise its weight or drop it")
    return mix
