"""Prepared data directories in other shapes than `prepare_data` writes today."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


def flat_format_copy(src: Path, dst: Path, *, train_ids: dict[int, int] | None = None) -> Path:
    """``src`` (format tandem-data/2) rewritten as the older tandem-data/1: one flat ``<split>.bin``
    per split and a meta.json without a format or a recorded ``max_id``. ``train_ids`` sets train
    tokens {position: id}, e.g. an id past the vocabulary at one spot."""
    meta = json.loads((Path(src) / "meta.json").read_text())
    dst.mkdir(parents=True)
    shutil.copy(Path(src) / meta["tokenizer"]["file"], dst / meta["tokenizer"]["file"])
    flat = {"vocab_size": meta["vocab_size"], "dtype": meta["dtype"]}
    for name in ("train", "val"):
        tokens = np.concatenate([np.fromfile(Path(src) / s["file"], dtype=meta["dtype"])
                                 for s in meta["splits"][name]["shards"]])
        if name == "train":
            for at, v in (train_ids or {}).items():
                tokens[at] = v
        tokens.tofile(dst / f"{name}.bin")
        flat[f"{name}_tokens"] = len(tokens)
    (dst / "meta.json").write_text(json.dumps(flat))
    return dst
