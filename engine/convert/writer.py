"""Writing a Tandem checkpoint as a converter does: plan the regions, pack them into files, stream
each region into its file inside ``DST.tmp``, and rename it into place only when all is written.

Shared by the Tandem-to-Tandem tools (`engine.convert.tandem`) and the Hugging Face import
(`engine.convert.hf`), so neither imports the other for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError
from engine.convert.stream import StreamWriter, TensorSpec, dtype_name, nbytes


@dataclass(frozen=True)
class Region:
    """Region ``(offset, shape)`` of global tensor ``key`` (shape ``global_shape``), stored as ``dtype``."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def full(cls, key, shape, dtype) -> "Region":
        shape = tuple(shape)
        return cls(key, shape, (0,) * len(shape), shape, dtype)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


@contextlib.contextmanager
def staged_output(dst: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield ``DST.tmp`` to write into; rename it to ``DST`` only when the body completes."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise CheckpointError(f"destination {str(dst)!r} already exists; choose another path or pass --force "
                              f"to replace it")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted conversion
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)


def pack(regions: list[Region], max_bytes: int | None) -> list[list[Region]]:
    """Greedy packing in order: a new file starts when the next region would push this one past
    ``max_bytes`` (a region larger than the limit gets a file of its own)."""
    files: list[list[Region]] = [[]]
    size = 0
    for r in regions:
        if files[-1] and max_bytes and size + r.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(r)
        size += r.nbytes
    return [f for f in files if f]


def write_tandem(dst: Path, files: dict[str, list[Region]], read: Callable[[Region], torch.Tensor], *,
                 model_config: dict, layout: dict, train_state: dict, step: int) -> None:
    """Write a Tandem checkpoint into ``dst`` (an existing empty directory), file by file."""
    records = []
    for fname, regions in files.items():
        specs = [TensorSpec(r.key, r.shape, r.dtype) for r in regions]
        meta = {r.key: json.dumps({"global_shape": list(r.global_shape), "offset": list(r.offset)}) for r in regions}
        w = StreamWriter(dst / fname, specs, meta)
        for r in regions:
            w.write(r.key, read(r))
        sha, size = w.close()
        records.append({"file": fname, "sha256": sha, "bytes": size, "tensors": [
            {"key": r.key, "global_shape": list(r.global_shape), "offset": list(r.offset), "shape": list(r.shape),
             "dtype": dtype_name(r.dtype)} for r in regions]})
    ckpt._write_manifest(dst, records, step=step, model_config=model_config, layout=layout, train_state=train_state)
