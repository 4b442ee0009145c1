"""Layout-independent checkpoints.

A checkpoint is a directory ``step_000123/`` holding safetensors files and ``manifest.json``.
Every tensor is stored under its *global* name (``model/<param>``, ``optim/<state>/<param>``)
with the region of the global tensor it holds in the file's metadata; the manifest lists, per
global tensor, its shape, dtype and which file holds which slice, plus the model config, the
step, the layout it was saved from, free-form train state, and a SHA-256 per file. Any layout
loads any checkpoint by reading only the slices it needs (``safe_open(...).get_slice``).

A slice held by several ranks (replicated parameters, data-parallel copies) is written once, by
the lowest rank holding it. Saving writes ``step_000123.tmp/`` (each file fsynced before its
checksum), agrees across ranks that every write succeeded, and renames it into place; ``latest``
is updated last, atomically, and rotation goes by parsed step number. A crash mid-save leaves the
previous checkpoint intact; a failure on any rank raises `SaveFailed` on all of them.
docs/checkpoints.md has the policies (rotation, abandoned history, fallback) and the fault table.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine.layout import lowest_holders
from models.shard import ShardMeta

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


# -- the key scheme: a tensor is stored under its global parameter name, prefixed by what it holds
MODEL, OPTIM = "model/", "optim/"


def model_key(param: str) -> str:
    """``tok_embeddings.weight`` -> ``model/tok_embeddings.weight``."""
    return MODEL + param


def optim_key(state: str, param: str) -> str:
    """(``exp_avg``, ``output.weight``) -> ``optim/exp_avg/output.weight``."""
    return f"{OPTIM}{state}/{param}"


def param_of(key: str) -> str:
    """The parameter a key belongs to: ``model/<p>`` and ``optim/<state>/<p>`` -> ``<p>``."""
    if key.startswith(MODEL):
        return key.removeprefix(MODEL)
    if key.startswith(OPTIM):
        return key.split("/", 2)[2]
    raise ValueError(f"{key!r} is not a checkpoint key (model/<param> or optim/<state>/<param>)")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"  # six digits for readability; past 999,999 it grows, and order comes from parse_step


_STEP_NAME = re.compile(r"step_(\d+)")


def parse_step(name: str) -> int | None:
    """The step of a checkpoint directory name (``step_000123`` -> 123), None for anything else
    (``step_000123.tmp``, ``step_000123.old``, ``latest``, ``abandoned``)."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SaveFailed(OSError):
    """A save that failed on some rank; every rank raises it with the same message (rank, path,
    OS error). The previous checkpoint is untouched."""


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _all_gather(obj, group) -> list:
    if _group_size(group) == 1:
        return [obj]
    out: list = [None] * _group_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(error: str | None, what: str, group) -> None:
    """Collective: raise `SaveFailed` on every rank when any rank reports an error."""
    _raise_failed([(r, e) for r, e in enumerate(_all_gather(error, group)) if e], what)


def _raise_failed(errors: list[tuple[int, str]], what: str) -> None:
    if errors:
        detail = "; ".join(f"rank {r}: {e}" for r, e in errors)
        raise SaveFailed(f"{what} failed ({detail}); the previous checkpoint is intact — fix the cause "
                         f"(disk space, permissions) and resume with checkpoint.resume=auto")


def held_lowest(items: list, group=None) -> list[bool]:
    """Collective over ``group``: for each of this rank's ``items``, whether this rank is the
    lowest holding it (`engine.layout.lowest_holders`)."""
    first = lowest_holders(_all_gather(items, group))
    rank = _group_rank(group)
    out, seen = [], set()
    for item in items:   # an item this rank holds twice (rank 0's two tied-embedding copies in a V) counts once
        out.append(first[item] == rank and item not in seen)
        seen.add(item)
    return out


def owned_indices(entries: list[Entry], group=None) -> list[int]:
    """Collective: the indices of the entries this rank writes — a (key, region) held by several
    ranks goes to the lowest. Fixed by the layout, so callers compute it once and reuse it."""
    mine = [(e.key, tuple(e.meta.offset), tuple(e.meta.shape)) for e in entries]
    return [i for i, owned in enumerate(held_lowest(mine, group)) if owned]


def host_copy(entries: list[Entry], owned: list[int], *, copy: bool) -> list[tuple[Entry, torch.Tensor]]:
    """The owned local regions as CPU tensors. ``copy`` forces a private copy even of a CPU tensor
    (needed when training goes on while a background thread writes it)."""
    out = []
    with torch.no_grad():
        for i in owned:
            e = entries[i]
            t = e.tensor.detach()[e.meta.local_slices()]
            t = t.to("cpu", copy=True) if copy else t.to("cpu")
            out.append((e, t.contiguous()))
    return out


def _write_local(tmp: Path, fname: str, items: list[tuple[Entry, torch.Tensor]]) -> dict:
    """Write this rank's file into ``tmp`` and fsync it before its checksum is taken."""
    record = {"file": fname, "tensors": []}
    if not items:
        return record
    tensors, metadata = {}, {}
    for e, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{e.key} holds non-finite values; non-finite weights are never saved")
        tensors[e.key] = t
        metadata[e.key] = json.dumps({"global_shape": e.meta.global_shape, "offset": e.meta.offset})
        record["tensors"].append({"key": e.key, "global_shape": list(e.meta.global_shape),
                                  "offset": list(e.meta.offset), "shape": list(e.meta.shape),
                                  "dtype": str(t.dtype).removeprefix("torch.")})
    save_file(tensors, tmp / fname, metadata={"format": "pt", **metadata})
    _fsync_file(tmp / fname)
    record["sha256"] = sha256_file(tmp / fname)
    record["bytes"] = (tmp / fname).stat().st_size
    return record


def _files(fname: str, items: list[tuple[Entry, torch.Tensor]]) -> list[tuple[str, list]]:
    """A rank's items spread over files so that no file holds a key twice: ``fname`` takes each key's
    first region, ``<stem>_1.safetensors`` its second, and so on. Only ZeRO-2 holds several regions
    of one tensor (the boxes of a flat slice, `engine.zero.flat_boxes`); the manifest names the file
    of every slice, so readers need no change."""
    layers: list[list] = [[]]
    seen: dict[str, int] = {}
    for item in items:
        k = seen[item[0].key] = seen.get(item[0].key, -1) + 1
        if k == len(layers):
            layers.append([])
        layers[k].append(item)
    stem = fname.removesuffix(".safetensors")
    return [(fname if k == 0 else f"{stem}_{k}.safetensors", layer) for k, layer in enumerate(layers)]


def _error_text(e: BaseException, path: Path) -> str:
    return f"{type(e).__name__} writing {str(path)!r}: {e}"


def write_checkpoint(root: str | Path, step: int, items: list[tuple[Entry, torch.Tensor]], *, model_config: dict,
                     layout: dict, train_state: dict, keep_last: int = 0, protect: Iterable[str] = (),
                     group=None) -> Path:
    """Collective over ``group``: write the host copies of every rank into ``step_N.tmp/``, agree
    that all succeeded, then (rank 0) write the manifest, swap the directory into place, point
    ``latest`` at it and rotate. Each phase ends with an agreement, so an error on any rank raises
    `SaveFailed` on all of them at once instead of leaving them blocked in a collective."""
    root = Path(root)
    rank = _group_rank(group)
    name = step_dir_name(step)
    final, tmp = root / name, root / (name + ".tmp")
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an earlier crashed save
            tmp.mkdir()
        except OSError as e:
            error = _error_text(e, tmp)
    _agree(error, f"checkpoint save of step {step}", group)
    fname = f"rank_{_global_rank():05d}.safetensors"
    try:
        record, error = [_write_local(tmp, f, layer) for f, layer in _files(fname, items)], None
    except (OSError, FloatingPointError) as e:
        record, error = None, _error_text(e, tmp / fname)
    records = _all_gather((record, error), group)
    failed = [(r, err) for r, (_, err) in enumerate(records) if err]
    if failed and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _raise_failed(failed, f"checkpoint save of step {step}")
    error = None
    if rank == 0:
        try:
            _write_manifest(tmp, [r for recs, _ in records for r in recs], step=step, model_config=model_config, layout=layout,
                            train_state=train_state)
            _fsync_dir(tmp)
            _swap_into_place(tmp, final)
            _update_latest(root, final.name)
        except OSError as e:
            error = _error_text(e, final)
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None and keep_last:
            prune(root, keep_last, current=step, protect={final.name, *protect})
    _agree(error, f"checkpoint save of step {step}", group)
    return final


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _swap_into_place(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final``. Re-saving a step moves the old directory aside first and deletes
    it only once the new one is in place and the rename is durable (`recover` finishes the job
    after a crash in between)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(root: str | Path) -> None:
    """Finish or undo what a crash interrupted (one launch per run directory holds the lock, so
    nothing here is in use): a ``step_N.old`` whose ``step_N`` is complete is deleted, one whose
    ``step_N`` is missing is moved back; ``*.tmp`` leftovers are deleted."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.endswith(".old") and parse_step(p.name[:-4]) is not None:
            final = p.with_name(p.name[:-4])
            if (final / MANIFEST).is_file():
                shutil.rmtree(p, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(p, final)
        elif p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    _fsync_dir(root)


def save(root: str | Path, step: int, entries: list[Entry], *, model_config: dict, layout: dict,
         train_state: dict, keep_last: int = 0, protect: Iterable[str] = (), group=None) -> Path:
    """Collective: every rank of ``group`` (default: the world) calls it with its local entries."""
    items = host_copy(entries, owned_indices(entries, group), copy=False)
    return write_checkpoint(root, step, items, model_config=model_config, layout=layout, train_state=train_state,
                            keep_last=keep_last, protect=protect, group=group)


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
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints directly under ``root`` (not in ``abandoned/``), by step number."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None and (p / MANIFEST).is_file())]


def prune(root: Path, keep_last: int, *, current: int, protect: Iterable[str] = ()) -> list[Path]:
    """Keep the ``keep_last`` newest checkpoints of this history (steps up to ``current``, the one
    just written); never delete a protected name (the one just written, the one resumed from).
    Checkpoints past ``current`` belong to an abandoned history and are not rotated here: the
    trainer moves them to ``abandoned/`` when it resumes from an older step."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be at least 1 (0 keeps everything and does not prune)")
    protect = set(protect)
    mine = [p for p in list_checkpoints(root) if parse_step(p.name) <= current]
    doomed = [p for p in mine[:-keep_last] if p.name not in protect]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def check_intact(path: Path) -> dict:
    """Raise `CheckpointError` unless the manifest reads and every file matches its checksum; return
    the manifest."""
    manifest = read_manifest(path)
    verify_files(path, manifest, manifest["files"])
    return manifest


def resolve(root: str | Path, resume: str | None, *, warn=None) -> Path | None:
    """The checkpoint directory `find` picks (see there), without its manifest."""
    return find(root, resume, warn=warn)[0]


def find(root: str | Path, resume: str | None, *, warn=None) -> tuple[Path | None, dict | None]:
    """``checkpoint.resume`` / ``checkpoint.load`` -> (directory, its manifest), each read once:
    None -> (None, None); ``auto`` -> the newest intact checkpoint under root (manifest readable,
    every file matching its checksum), (None, None) when there is none; a damaged newer one is
    skipped with a warning (``warn(message)``, default stderr) naming it. When every one is damaged
    this raises the newest one's error rather than silently starting over. Anything else is a
    checkpoint directory that must exist and have a readable manifest."""
    if resume is None:
        return None, None
    if resume == "auto":
        found = list_checkpoints(root)
        errors = []
        for cand in reversed(found):
            try:
                manifest = check_intact(cand)
            except CheckpointError as e:
                errors.append(e)
                (warn or _warn)(f"warning: skipping checkpoint {str(cand)!r}: {e}")
                continue
            return cand, manifest
        if errors:
            raise errors[0]
        return None, None
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{resume!r} is not a checkpoint directory (no {MANIFEST}); point "
                              f"checkpoint.resume / checkpoint.load at a step_XXXXXX directory, or use 'auto'")
    return path, read_manifest(path)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
