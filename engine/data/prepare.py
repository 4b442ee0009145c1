"""Streaming, parallel preparation of a corpus into a prepared data directory (format ``tandem-data/2``).

    tokenizer.model | tokenizer.json    the tokenizer, as given or trained
    train_00000.bin ...                 token shards: the flat token stream of the training documents,
    val_00000.bin ...                   each document followed by EOS; shard k holds tokens [k·S, (k+1)·S)
    train.idx, val.idx                  uint64 start offset of every document, then the total
    meta.json                           counts, dtype, tokenizer hash, sources; written last

Documents are read in a fixed order and cut into chunks; ``workers`` processes tokenize chunks while the
main process writes results back **in chunk order**, so the output is byte-identical for any number of
workers. At most a few chunks per worker are in flight, so memory is bounded whatever the corpus size.
Everything is written to a temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.data.errors import DataError
from engine.data.inputs import Chunk, DecodeStats, corpus_files, decode_chunk, read_chunks
from engine.data.tokenizer import Tokenizer, check_vocab, load_tokenizer, reservoir_lines, train_sentencepiece

FORMAT = "tandem-data/2"
SPLIT_SEED = 0  # the validation sample and the tokenizer's training sample do not depend on train.seed


def read_meta(data_dir: str | Path) -> dict:
    """A prepared directory's meta.json, or a DataError saying it is damaged."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}); the prepared directory is damaged, "
                        f"prepare it again (scripts/prepare_data.py data.dir=... data.force=true)") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta or "dtype" not in meta:
        raise DataError(f"{path} is not a Tandem data meta.json (no vocab_size/dtype); prepare the directory again")
    return meta


def is_prepared(data_dir: str | Path) -> bool:
    return (Path(data_dir) / "meta.json").is_file()


def prepare_data(corpus: str, out_dir: str | Path, vocab_size: int, *, tokenizer: str | None = None,
                 text_key: str = "text", workers: int = 1, skip_bad: bool = False, val_fraction: float = 0.01,
                 shard_tokens: int = 1 << 28, chunk_bytes: int = 1 << 20, sample_lines: int = 400_000,
                 progress: bool = True, replace: bool = False) -> dict:
    """Tokenize ``corpus`` into ``out_dir``; returns its meta. See the module docstring for the layout.
    An already prepared ``out_dir`` is refused unless ``replace``; then the new directory takes its
    place only once complete (the old one is renamed aside first and deleted last)."""
    out = Path(out_dir)
    _check_args(out, workers, val_fraction, replace)
    files = corpus_files(corpus)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = _get_tokenizer(files, tokenizer, vocab_size, text_key, skip_bad, sample_lines, progress)
        (tmp / tok.file_name).write_bytes(tok.blob)
        meta = _tokenize_all(files, tok, tmp, workers=workers, text_key=text_key, skip_bad=skip_bad,
                             val_fraction=val_fraction, shard_tokens=shard_tokens, chunk_bytes=chunk_bytes,
                             progress=progress)
        meta["sources"] = [str(f) for f in files] if corpus != "stdlib" else ["stdlib"]
        meta["corpus"] = corpus if corpus == "stdlib" else str(Path(corpus).expanduser().resolve())
        _write_json(tmp / "meta.json", meta)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if is_prepared(out):  # replace=True: swap, so a failure until here left the old one intact
            os.replace(out, old)
        elif out.is_dir():
            out.rmdir()  # an empty directory (checked above) may stand where the result goes
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _report(meta, out)
    return meta


def _check_args(out: Path, workers: int, val_fraction: float, replace: bool = False) -> None:
    if is_prepared(out) and not replace:
        raise DataError(f"{str(out)!r} is already a prepared data directory; delete it to prepare again, "
                        f"or set data.dir to a new directory")
    if out.exists() and not is_prepared(out) and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{str(out)!r} exists and is not a prepared data directory; remove it or set data.dir "
                        f"to a new directory")
    if workers < 1:
        raise DataError(f"data.workers={workers} must be at least 1")
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")


def _get_tokenizer(files, path, vocab_size, text_key, skip_bad, sample_lines, progress) -> Tokenizer:
    if path:
        tok = load_tokenizer(path)
    else:
        if progress:
            print(f"training a SentencePiece BPE tokenizer (vocab {vocab_size}) on a sample of at most "
                  f"{sample_lines:,} lines", flush=True)
        texts = (t for c in read_chunks(files, text_key=text_key)
                 for t in decode_chunk(c, text_key=text_key, skip_bad=skip_bad)[0])
        tok = train_sentencepiece(reservoir_lines(texts, sample_lines, seed=SPLIT_SEED), vocab_size,
                                  seed=SPLIT_SEED)
        if tok.vocab_size != vocab_size:
            raise DataError(f"the corpus is too small for a vocabulary of {vocab_size} (SentencePiece made "
                            f"{tok.vocab_size}); use a larger corpus or a smaller model.vocab_size")
    check_vocab(tok, vocab_size)
    return tok


# -- the workers -------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tok_state: tuple, text_key: str, skip_bad: bool, dtype: str) -> None:
    kind, blob, eos_token, origin = tok_state
    _WORKER.update(tok=Tokenizer(kind, blob, eos_token=eos_token, origin=origin), text_key=text_key,
                   skip_bad=skip_bad, dtype=np.dtype(dtype))


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, DecodeStats, int]:
    """(tokens of all documents, each followed by EOS; document lengths; stats; disk bytes)."""
    w = _WORKER
    texts, stats = decode_chunk(chunk, text_key=w["text_key"], skip_bad=w["skip_bad"])
    ids = w["tok"].encode_batch(texts)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=w["dtype"])
    ends = np.cumsum(lengths)
    for d, end in zip(ids, ends):
        tokens[end - len(d) - 1:end - 1] = d
    tokens[ends - 1] = w["tok"].eos_id
    return tokens, lengths, stats, chunk.disk_bytes


def ordered_map(fn, items, *, workers: int, init, init_args: tuple, window: int):
    """``map(fn, items)`` in order over ``workers`` processes, with at most ``window`` items in flight
    (``Pool.imap`` would read the whole input ahead). ``workers=1`` runs in this process."""
    if workers == 1:
        init(*init_args)
        yield from map(fn, items)
        return
    # fork: workers inherit the loaded modules, and start in milliseconds
    with mp.get_context("fork").Pool(workers, init, init_args) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- the writer ---------------------------------------------------------------------------------------
class SplitWriter:
    """Appends documents to one split's token shards and document index."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.name, self.dtype, self.shard_tokens = root, name, dtype, shard_tokens
        self.tokens = self.docs = self.max_id = 0
        self.shards: list[dict] = []
        self.index = open(root / f"{name}.idx", "wb")
        self._shard = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        starts = self.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        self.index.write(np.asarray(starts, dtype=np.uint64).tobytes())
        self.docs += len(lengths)
        if len(tokens):
            self.max_id = max(self.max_id, int(tokens.max()))
        while len(tokens):
            if self._shard is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_shard()
            take = min(len(tokens), self.shard_tokens - self.shards[-1]["tokens"])
            self._shard.write(tokens[:take].tobytes())
            self.shards[-1]["tokens"] += take
            self.tokens += take
            tokens = tokens[take:]

    def _open_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        name = f"{self.name}_{len(self.shards):05d}.bin"
        self._shard = open(self.root / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        self.index.write(np.asarray([self.tokens], dtype=np.uint64).tobytes())  # the end of the last document
        self.index.close()
        if self._shard is not None:
            self._shard.close()
        return {"tokens": self.tokens, "docs": self.docs, "max_id": self.max_id, "shards": self.shards,
                "index": f"{self.name}.idx"}


def is_val_doc(k: np.ndarray, period: int) -> np.ndarray:
    """The held-out sample: in every block of ``period`` consecutive documents, exactly one, at a
    position drawn from a hash of the block number. Deterministic, streaming, an exact fraction."""
    block = (k // period).astype(np.uint64)
    h = (block + np.uint64(SPLIT_SEED + 1)) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (k % period) == (h % np.uint64(period)).astype(np.int64)


def _tokenize_all(files, tok: Tokenizer, root: Path, *, workers, text_key, skip_bad, val_fraction, shard_tokens,
                  chunk_bytes, progress) -> dict:
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    split = {name: SplitWriter(root, name, dtype, shard_tokens) for name in ("train", "val")}
    period = max(2, round(1 / val_fraction))
    stats, n_docs = DecodeStats(), 0
    bar = _Progress(sum(f.stat().st_size for f in files), enabled=progress)
    chunks = read_chunks(files, text_key=text_key, chunk_bytes=chunk_bytes)
    results = ordered_map(_encode_chunk, chunks, workers=workers, init=_init_worker,
                          init_args=(tok.state(), text_key, skip_bad, dtype.name), window=4 * workers)
    for tokens, lengths, chunk_stats, disk_bytes in results:
        val = is_val_doc(np.arange(n_docs, n_docs + len(lengths)), period)
        token_val = np.repeat(val, lengths)
        split["train"].write(tokens[~token_val], lengths[~val])
        split["val"].write(tokens[token_val], lengths[val])
        n_docs += len(lengths)
        stats.add(chunk_stats)
        bar.update(disk_bytes, len(lengths), len(tokens))
    bar.close()
    splits = {name: w.close() for name, w in split.items()}
    if not splits["val"]["docs"]:
        raise DataError(f"no document was held out for validation ({n_docs} documents, data.val_fraction="
                        f"{val_fraction} holds out one in {period}); raise data.val_fraction to at least "
                        f"{1 / max(n_docs, 1):.3g}, or use a corpus of more documents")
    return {"format": FORMAT, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer": {"file": tok.file_name, "kind": tok.kind, "sha256": tok.sha256, "origin": tok.origin},
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"], "splits": splits,
            "documents": n_docs, "val_fraction": val_fraction, "skipped_empty": stats.empty,
            "skipped_bad_json": stats.bad_json, "replaced_utf8_docs": stats.bad_utf8,
            "seconds": round(bar.elapsed(), 3), "workers": workers, "text_key": text_key}


class _Progress:
    """A bar over bytes on disk, with documents/s and tokens/s."""

    def __init__(self, total_bytes: int, *, enabled: bool):
        self.t0 = time.perf_counter()
        self.docs = self.tokens = 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(self.elapsed(), 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s {self.tokens / dt:,.0f} tokens/s", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _report(meta: dict, out: Path) -> None:
    t = max(meta["seconds"], 1e-9)
    print(f"prepared {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from "
          f"{meta['documents']:,} documents in {t:.1f} s ({meta['documents'] / t:,.0f} docs/s, "
          f"{(meta['train_tokens'] + meta['val_tokens']) / t:,.0f} tokens/s)", flush=True)
    skipped = [f"{meta[k]:,} {what}" for k, what in (("skipped_empty", "empty documents skipped"),
                                                     ("skipped_bad_json", "invalid JSON lines skipped"),
                                                     ("replaced_utf8_docs", "documents with invalid UTF-8 "
                                                                            "(replaced by U+FFFD)")) if meta[k]]
    if skipped:
        print("  " + "; ".join(skipped), flush=True)


def tokenizer_hash(data_dir: str | Path) -> str:
    """The sha256 of a prepared directory's tokenizer (from its meta, or hashed for an older format)."""
    d = Path(data_dir)
    meta = read_meta(d)
    if "tokenizer" in meta:
        return meta["tokenizer"]["sha256"]
    f = d / "tokenizer.model"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "unknown"


def prepare_once(out: str | Path, *, rank: int, barrier, progress_every_s: float = 30.0, **kwargs) -> None:
    """Rank 0 prepares ``out`` (``prepare_data(out_dir=out, **kwargs)``) if it is not prepared yet; the
    other ranks wait for its ``meta.json`` to appear, printing a progress line, with no timed collective
    to run out (a large corpus takes longer than any sensible ``parallel.timeout_s``). If rank 0 fails it
    leaves a flag file with its error, and the waiting ranks stop with it. ``out`` must be on a file
    system all ranks see."""
    out = Path(out)
    failed = out.parent / f".{out.name}.failed"
    if rank == 0 and not is_prepared(out):
        failed.unlink(missing_ok=True)
    barrier()  # no rank reads the flag before rank 0 has removed a stale one
    if rank == 0:
        if not is_prepared(out):
            try:
                prepare_data(out_dir=out, **kwargs)
            except BaseException as e:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
        return
    _wait_for(out, failed, rank, progress_every_s)


def _wait_for(out: Path, failed: Path, rank: int, every_s: float) -> None:
    t0 = last = time.monotonic()
    while not is_prepared(out):
        if failed.is_file():
            raise DataError(f"rank 0 failed to prepare {str(out)!r}: {failed.read_text()}")
        time.sleep(0.2)
        if rank == 1 and time.monotonic() - last >= every_s:  # one waiting rank speaks for all
            last = time.monotonic()
            print(f"rank 1 (and the others): waiting for rank 0 to prepare {out} "
                  f"({last - t0:.0f} s)", file=sys.stderr, flush=True)
