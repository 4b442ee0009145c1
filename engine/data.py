"""Token data: preparing a corpus (SentencePiece BPE + flat token files) and reading batches.

A prepared data directory holds ``tokenizer.model``, ``train.bin``, ``val.bin`` (flat token ids,
uint16 when the vocabulary fits, else uint32) and ``meta.json``.

Data order is layout-independent: the sequences of step ``s`` are a function of ``(seed, s)``
only, and data-parallel ranks take disjoint contiguous slices of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sysconfig
from pathlib import Path

import numpy as np
import torch

META_FORMAT = "tandem-data/1"
VAL_FRACTION = 0.01
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml"}


class DataError(ValueError):
    """A corpus or prepared data directory that cannot be used (the message says how to fix it)."""


def corpus_files(corpus: str) -> list[Path]:
    """The text files of a corpus: ``stdlib`` (this Python's standard library sources) or a directory."""
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    else:
        root = Path(corpus).expanduser()
        if not root.is_dir():
            raise DataError(f"corpus directory {str(root)!r} does not exist; set data.corpus to a directory of "
                            f"text files, or to 'stdlib' for the built-in corpus")
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    files = sorted(files)
    if not files:
        raise DataError(f"corpus {corpus!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}); "
                        f"add some or set data.corpus to another directory")
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, *, max_lines: int = 400_000, seed: int = 0) -> bytes:
    """Train a SentencePiece BPE model on the lines of ``files``; returns the serialized model."""
    import sentencepiece as spm

    lines = [ln for f in files for ln in _read(f).splitlines() if ln.strip()]
    random.Random(seed).shuffle(lines)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines[:max_lines]), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, character_coverage=0.9999,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=os.cpu_count() or 1,
        hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def prepare_data(corpus: str, out_dir: str | Path, vocab_size: int, *, progress: bool = True) -> dict:
    """Tokenize ``corpus`` into ``out_dir``. Files are written to a temporary name, then renamed."""
    import sentencepiece as spm
    from tqdm import tqdm

    out = Path(out_dir)
    files = corpus_files(corpus)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"preparing {corpus!r}: {len(files)} files -> {out} (SentencePiece BPE, vocab {vocab_size})", flush=True)
    proto = train_tokenizer(files, vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.get_piece_size() != vocab_size:
        raise DataError(f"corpus {corpus!r} is too small for a vocabulary of {vocab_size} "
                        f"(SentencePiece made {sp.get_piece_size()}); use a larger corpus or a smaller model.vocab_size")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    ids: list[np.ndarray] = []
    for f in tqdm(files, desc="tokenizing", unit="file", disable=not progress):
        ids.append(np.asarray(sp.encode(_read(f)) + [sp.eos_id()], dtype=dtype))
    tokens = np.concatenate(ids)
    n_val = max(int(len(tokens) * VAL_FRACTION), 1)
    split = {"train": tokens[:-n_val], "val": tokens[-n_val:]}
    for name, arr in split.items():
        tmp = out / f"{name}.bin.tmp"
        arr.tofile(tmp)
        os.replace(tmp, out / f"{name}.bin")
    (out / "tokenizer.model").write_bytes(proto)
    meta = {"format": META_FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
            "train_tokens": int(len(split["train"])), "val_tokens": int(len(split["val"])),
            "corpus": corpus if corpus == "stdlib" else str(Path(corpus).resolve()),
            "corpus_files": len(files), "eos_id": sp.eos_id()}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")  # written last: its presence marks the directory complete
    if progress:
        print(f"prepared {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens", flush=True)
    return meta


def is_prepared(data_dir: str | Path) -> bool:
    return (Path(data_dir) / "meta.json").is_file()


class TokenData:
    """A prepared data directory, memory-mapped."""

    def __init__(self, data_dir: str | Path, *, vocab_size: int | None = None):
        d = Path(data_dir)
        if not is_prepared(d):
            raise DataError(f"{str(d)!r} is not a prepared data directory (no meta.json); run "
                            f"`python scripts/prepare_data.py data.dir={d}` or point data.dir at one")
        self.meta = json.loads((d / "meta.json").read_text())
        if vocab_size is not None and self.meta["vocab_size"] != vocab_size:
            raise DataError(
                f"the tokenizer in {str(d)!r} has vocab size {self.meta['vocab_size']} but model.vocab_size is "
                f"{vocab_size}; set model.vocab_size={self.meta['vocab_size']} or use another data.dir")
        dtype = np.dtype(self.meta["dtype"])
        self.train = np.memmap(d / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(d / "val.bin", dtype=dtype, mode="r")
        self.dir = d

    def train_batch(self, step: int, *, seed: int, batch_size: int, seq_len: int):
        """The ``batch_size`` sequences of optimizer step ``step``: (inputs, targets), each (B, T) int64."""
        n = len(self.train) - seq_len - 1
        if n <= 0:
            raise DataError(f"train.bin in {str(self.dir)!r} has {len(self.train)} tokens, fewer than "
                            f"train.seq_len+1={seq_len + 1}; use a larger corpus or a shorter train.seq_len")
        digest = hashlib.sha256(f"tandem-data/{seed}/{step}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        starts = torch.randint(0, n + 1, (batch_size,), generator=g).tolist()
        return self._windows(self.train, starts, seq_len)

    def eval_windows(self, first: int, count: int, *, seq_len: int):
        """Windows ``first .. first+count-1`` of val.bin; window i is tokens [i·T, (i+1)·T + 1)."""
        need = (first + count) * seq_len + 1
        if need > len(self.val):
            raise DataError(f"val.bin in {str(self.dir)!r} has {len(self.val)} tokens but eval needs {need}; "
                            f"lower eval.batches or train.global_batch_size, or prepare a larger corpus")
        return self._windows(self.val, [i * seq_len for i in range(first, first + count)], seq_len)

    @staticmethod
    def _windows(arr, starts, seq_len):
        w = torch.from_numpy(np.stack([np.asarray(arr[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
        return w[:, :-1], w[:, 1:]
