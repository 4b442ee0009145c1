"""Layout-independent checkpoints.

A checkpoint is a directory ``step_000123/`` holding safetensors files and ``manifest.json``.
Every tensor is stored under its *global* name (``model/<param>``, ``optim/<state>/<param>``)
with the region of the global tensor it holds in the file's metadata; the manifest lists, per
global tensor, its shape, dtype and which file holds which slice, plus the model config, the
step, the layout it was saved from, free-form train state, and a SHA-256 per file. Any layout
loads any checkpoint by reading only the slices it needs (``safe_open(...).get_slice``).

A slice held by several ranks (replicated parameters, data-parallel copies) is written once, by
the lowest rank holding it. Saving writes ``step_000123.tmp/`` and renames it into place when
complete; ``latest`` is updated last, atomically. A crash mid-save leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from models.init import ShardMeta

FORMAT = "tandem-checkpoint/1"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Entry:
    """One local tensor to save or load: global ``key``, the local tensor, and where it sits."""

    key: str
    tensor: torch.Tensor
    meta: ShardMeta


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owned(entries: list[Entry], group=None) -> list[Entry]:
    """The entries this rank writes: a (key, region) held by several ranks goes to the lowest."""
    mine = [(e.key, e.meta.offset, e.meta.shape) for e in entries]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return entries
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    rank = dist.get_rank(group)
    first_holder = {}
    for r, items in enumerate(everyone):
        for item in items:
            first_holder.setdefault(item, r)
    return [e for e, item in zip(entries, mine) if first_holder[item] == rank]


def save(root: str | Path, step: int, entries: list[Entry], *, model_config: dict, layout: dict,
         train_state: dict, keep_last: int | None = None) -> Path:
    """Collective: every rank of the default group calls it with its local entries."""
    root = Path(root)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crashed save
        tmp.mkdir()
    if distributed:
        dist.barrier()
    owned = _owned(entries)
    fname = f"rank_{rank:05d}.safetensors"
    record = {"file": fname, "tensors": []}
    if owned:
        tensors, metadata = {}, {}
        for e in owned:
            t = e.tensor.detach()[e.meta.local_slices()].to("cpu").contiguous()
            tensors[e.key] = t
            metadata[e.key] = json.dumps({"global_shape": e.meta.global_shape, "offset": e.meta.offset})
            record["tensors"].append({"key": e.key, "global_shape": list(e.meta.global_shape),
                                      "offset": list(e.meta.offset), "shape": list(e.meta.shape),
                                      "dtype": str(t.dtype).removeprefix("torch.")})
        save_file(tensors, tmp / fname, metadata={"format": "pt", **metadata})
        record["sha256"] = sha256_file(tmp / fname)
        record["bytes"] = (tmp / fname).stat().st_size
    records: list = [None] * (dist.get_world_size() if distributed else 1)
    if distributed:
        dist.all_gather_object(records, record)
    else:
        records = [record]
    if rank == 0:
        _write_manifest(tmp, records, step=step, model_config=model_config, layout=layout, train_state=train_state)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside only once the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _update_latest(root, final.name)
        if keep_last:
            prune(root, keep_last)
    if distributed:
        dist.barrier()
    return final


def _write_manifest(d: Path, records: list[dict], **fields) -> None:
    tensors: dict[str, dict] = {}
    files = {}
    for rec in records:
        if not rec["tensors"]:
            continue
        files[rec["file"]] = {"sha256": rec["sha256"], "bytes": rec["bytes"]}
        for t in rec["tensors"]:
            info = tensors.setdefault(t["key"], {"global_shape": t["global_shape"], "dtype": t["dtype"], "slices": []})
            info["slices"].append({"file": rec["file"], "offset": t["offset"], "shape": t["shape"]})
    manifest = {"format": FORMAT, **fields, "tensors": dict(sorted(tensors.items())), "files": files}
    write_json_atomic(d / MANIFEST, manifest)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _update_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and (p / MANIFEST).is_file())


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(root: str | Path, resume: str | None) -> Path | None:
    """``checkpoint.resume``: None -> None; ``auto`` -> the latest complete checkpoint under root
    (None when there is none yet); anything else is a checkpoint directory that must exist."""
    if resume is None:
        return None
    if resume == "auto":
        root = Path(root)
        latest = root / "latest"
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / MANIFEST).is_file():
                return cand
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{resume!r} is not a checkpoint directory (no {MANIFEST}); point "
                              f"checkpoint.resume / checkpoint.load at a step_XXXXXX directory, or use 'auto'")
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} has no {MANIFEST}: not a Tandem checkpoint, or an incomplete save") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is corrupt ({e}); use an earlier checkpoint") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_files(path: Path, manifest: dict, files: Iterable[str]) -> None:
    for fname in files:
        info = manifest["files"][fname]
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {fname}; it is incomplete — "
                                  f"resume from an earlier checkpoint")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {fname} does not match its checksum "
                                  f"(truncated or modified); resume from an earlier checkpoint")


def _overlap(a_off, a_shape, b_off, b_shape):
    """Intersection of two boxes as (start, stop) per dim, or None."""
    box = []
    for ao, asz, bo, bsz in zip(a_off, a_shape, b_off, b_shape):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if lo >= hi:
            return None
        box.append((lo, hi))
    return box


def _covers(boxes: list[tuple[slice, ...]], shape: tuple[int, ...]) -> bool:
    """Whether the boxes (slices into a tensor of ``shape``) cover all of it. Saved slices are
    disjoint, so their volumes add up; if two ever overlap, a mask settles it."""
    volume = sum(int(torch.Size([b.stop - b.start for b in box]).numel()) for box in boxes)
    disjoint = all(any(a.stop <= b.start or b.stop <= a.start for a, b in zip(x, y))
                   for i, x in enumerate(boxes) for y in boxes[i + 1:])
    if disjoint:
        return volume == int(torch.Size(shape).numel())
    mask = torch.zeros(shape, dtype=torch.bool)
    for box in boxes:
        mask[box] = True
    return bool(mask.all())


def load(path: str | Path, entries: list[Entry], *, manifest: dict | None = None, verify: bool = True,
         missing_ok: Iterable[str] = ()) -> None:
    """Fill each local entry's region from the checkpoint, whatever layout saved it."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    tensors = manifest["tensors"]
    missing_ok = set(missing_ok)
    plan: dict[str, list] = {}
    for e in entries:
        info = tensors.get(e.key)
        if info is None:
            if e.key in missing_ok:
                continue
            raise CheckpointError(f"checkpoint {str(path)!r} has no tensor {e.key!r}; it was saved from a "
                                  f"different model (check model.* against the checkpoint's manifest)")
        if tuple(info["global_shape"]) != e.meta.global_shape:
            raise CheckpointError(
                f"tensor {e.key!r} has shape {tuple(info['global_shape'])} in checkpoint {str(path)!r} but "
                f"{e.meta.global_shape} in this model; the checkpoint is from a different model shape")
        for s in info["slices"]:
            box = _overlap(e.meta.offset, e.meta.shape, s["offset"], s["shape"])
            if box is not None:
                plan.setdefault(s["file"], []).append((e, s, box))
    if verify:
        verify_files(path, manifest, plan)
    boxes: dict[int, list] = {id(e): [] for e in entries}
    for fname, items in plan.items():
        with safe_open(path / fname, framework="pt") as f:
            for e, s, box in items:
                src = f.get_slice(e.key)[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, s["offset"]))]
                dst = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, e.meta.offset))
                with torch.no_grad():
                    e.tensor[dst] = src.to(device=e.tensor.device, dtype=e.tensor.dtype)
                boxes[id(e)].append(dst)
    for e in entries:
        if e.key in tensors and not _covers(boxes[id(e)], tuple(e.meta.shape)):
            raise CheckpointError(f"checkpoint {str(path)!r} does not fully cover the region of {e.key!r} this "
                                  f"rank needs; it is incomplete or damaged — run `convert_checkpoint.py verify`")
