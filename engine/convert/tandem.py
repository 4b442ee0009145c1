"""Tandem-to-Tandem tools: consolidate, re-shard, inspect, verify.

Every output is planned first (which file holds which region of which tensor, in what dtype),
then written region by region: a region is assembled from the source's overlapping slices and
streamed into its file, so peak memory is one region (at most the largest tensor), never a file
and never the model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError
from engine.convert.hf import TOKENIZER_EXTRAS, inspect_hf
from engine.convert.sources import TandemSource, slice_problems
from engine.convert.stream import nbytes, read_header
from engine.convert.writer import Region, pack, staged_output, write_tandem
from engine.layout import check_end_only_empty, even_split, stage_bounds
from engine.tensor_parallel import param_shard, validate_tp
from models.config import ModelConfig


def _copy_extras(src: TandemSource, dst: Path) -> None:
    """A tokenizer recorded in the checkpoint directory travels with it, with its companion files."""
    tok = src.manifest.get("train_state", {}).get("tokenizer")
    if not tok:
        return
    for name in {tok, *TOKENIZER_EXTRAS}:
        if (src.path / name).is_file():
            shutil.copy(src.path / name, dst / name)


def _rewrite(src: TandemSource, dst: str | Path, files: dict[str, list[Region]], *, force: bool, how: dict) -> Path:
    m = src.manifest
    layout = {**m.get("layout", {}), **how}
    with staged_output(dst, force=force) as tmp:
        write_tandem(tmp, files, lambda r: src.read(r.key, r.offset, r.shape), model_config=m["model_config"],
                     layout=layout, train_state=m.get("train_state", {}), step=m.get("step", 0))
        _copy_extras(src, tmp)
    return Path(dst)


def consolidate(src: str | Path, dst: str | Path, *, max_file_bytes: int | None = None, force: bool = False) -> Path:
    """Full tensors (model and optimizer state) in one file, or several of at most ``max_file_bytes``."""
    s = TandemSource(src)
    regions = [Region.full(k, s.shape(k), s.dtype(k)) for k in s.tensors]
    packed = pack(regions, max_file_bytes)
    files = {f"consolidated_{i:05d}.safetensors": f for i, f in enumerate(packed)}
    return _rewrite(s, dst, files, force=force, how={"converted": "consolidate"})


# -- re-sharding for a target (tp, pp) layout --------------------------------------------------


def stage_layers(n_layers: int, pp: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """The layers of each of ``pp`` chunks (pp × virtual stages): the trainer's split
    (`engine.layout`), with errors that name the converter's flags. The first and last chunk may
    be empty (embedding only, head only); their tensors go by pp rank, not by layer, anyway."""
    if layers_per_stage is None:
        if n_layers < pp:
            raise CheckpointError(f"the model's {n_layers} layers cannot fill {pp} pipeline chunks (pp × virtual "
                                  f"stages); lower --pp or --virtual-stages")
        layers_per_stage = even_split(n_layers, pp)
    if len(layers_per_stage) != pp or sum(layers_per_stage) != n_layers:
        raise CheckpointError(f"layers per stage {layers_per_stage} must be {pp} counts (pp × virtual stages) "
                              f"summing to the model's {n_layers} layers; fix --layers-per-stage or --pp")
    try:  # the first chunk may hold only the embedding, the last only the head: as the trainer allows
        check_end_only_empty(layers_per_stage, "--layers-per-stage")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return [range(start, stop) for start, stop in stage_bounds(layers_per_stage)]


def tp_region(param: str, shape: tuple[int, ...], cfg: ModelConfig, tp: int, tp_rank: int,
              ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (offset, shape) of ``param`` that tensor-parallel rank ``tp_rank`` holds, by the trainer's own
    tensor-parallel plan (`engine.tensor_parallel.plan`), or None for a tensor every rank holds whole."""
    meta = param_shard(param, shape, cfg, tp, tp_rank).meta
    return None if meta.is_full else (meta.offset, meta.shape)


def reshard(src: str | Path, dst: str | Path, *, tp: int, pp: int, virtual_stages: int = 1,
            layers_per_stage: list[int] | None = None, force: bool = False) -> Path:
    """One file per (pp rank, tp rank) of the target layout holding exactly that rank's slices, so
    each rank reads its own file. A region several tp ranks hold (norms; a KV head shared by ranks)
    lives once, in the file of the lowest of them."""
    s = TandemSource(src)
    cfg = s.model_config
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tp {tp} and --pp {pp} must be positive")
    try:  # the layouts the trainer can run are the ones worth writing
        validate_tp(cfg, tp)
    except ValueError as e:
        raise CheckpointError(f"--tp {tp}: {e}") from None
    if virtual_stages < 1:
        raise CheckpointError(f"--virtual-stages {virtual_stages} must be at least 1")
    # chunk c of pp * virtual_stages goes to pp rank c % pp (the interleaved schedule's round robin)
    stages = stage_layers(cfg.n_layers, pp * virtual_stages, layers_per_stage)
    files: dict[str, list[Region]] = {}
    seen = set()
    for key in s.tensors:
        param = ckpt.param_of(key)
        if param.startswith("layers."):
            layer = int(param.split(".")[1])
            stage = next(i for i, r in enumerate(stages) if layer in r) % pp
        else:
            stage = 0 if param == "tok_embeddings.weight" else pp - 1
        shape = s.shape(key)
        for t in range(tp):
            box = tp_region(param, shape, cfg, tp, t)
            if box is None and t > 0:
                continue
            offset, sub = box if box is not None else ((0,) * len(shape), shape)
            if 0 in sub or (key, offset) in seen:
                continue
            seen.add((key, offset))
            files.setdefault(f"pp{stage:02d}_tp{t:02d}.safetensors", []).append(
                Region(key, shape, offset, sub, s.dtype(key)))
    files = dict(sorted(files.items()))
    return _rewrite(s, dst, files, force=force, how={"converted": f"reshard tp={tp} pp={pp}", "files_for": {
        "tp": tp, "pp": pp, "virtual_stages": virtual_stages, "layers_per_chunk": [len(r) for r in stages]}})


# -- inspect and verify ------------------------------------------------------------------------
def inspect(src: str | Path) -> dict:
    """What a checkpoint holds, read from its manifest (no tensor data is read). A Hugging Face
    directory is described too, from its config and shard headers."""
    if not (Path(src) / ckpt.MANIFEST).is_file() and (Path(src) / "config.json").is_file():
        return inspect_hf(src)
    s = TandemSource(src, verify=False)
    m = s.manifest
    rows, total = [], 0
    for key, info in s.tensors.items():
        b = nbytes(info["global_shape"], s.dtype(key))
        total += b
        rows.append({"key": key, "shape": info["global_shape"], "dtype": info["dtype"],
                     "slices": len(info["slices"]), "bytes": b})
    n_params = sum(torch.Size(r["shape"]).numel() for r in rows if r["key"].startswith(ckpt.MODEL))
    return {"path": str(s.path), "step": m.get("step"), "model_config": m["model_config"],
            "layout": m.get("layout", {}), "train_state": m.get("train_state", {}), "tensors": rows,
            "n_tensors": len(rows), "n_params": n_params, "tensor_bytes": total,
            "files": {f: i["bytes"] for f, i in m["files"].items()}}


def format_inspect(info: dict) -> str:
    lines = [f"checkpoint {info['path']}", f"step {info['step']}",
             "model " + ", ".join(f"{k}={v}" for k, v in info["model_config"].items()),
             "layout " + ", ".join(f"{k}={v}" for k, v in info["layout"].items()),
             f"{info['n_tensors']} tensors, {info['n_params']:,} model parameters, "
             f"{info['tensor_bytes'] / 2**20:.2f} MiB in {len(info['files'])} file(s)", ""]
    width = max(len(r["key"]) for r in info["tensors"])
    lines.append(f"{'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'slices':>6} {'bytes':>12}")
    for r in info["tensors"]:
        lines.append(f"{r['key']:<{width}}  {str(tuple(r['shape'])):<16} {r['dtype']:<9} {r['slices']:>6} "
                     f"{r['bytes']:>12,}")
    return "\n".join(lines)


def verify(src: str | Path) -> list[str]:
    """Check a checkpoint completely: every file's checksum, every file header against the
    manifest, every global tensor covered exactly once by its slices. Returns the checks made;
    raises `CheckpointError` listing every problem found."""
    path = Path(src)
    m = ckpt.read_manifest(path)
    problems, done = [], []
    headers = {}
    for fname in m["files"]:
        try:
            ckpt.verify_files(path, m, [fname])
            headers[fname] = read_header(path / fname)[0]
        except CheckpointError as e:
            problems.append(str(e))
    done.append(f"{len(m['files']) - len(problems)} of {len(m['files'])} files match their checksums")
    for key, info in m["tensors"].items():
        problems += slice_problems(key, info)
        for s in info["slices"]:
            spec = headers.get(s["file"], {}).get(key)
            if s["file"] in headers and (spec is None or spec.shape != tuple(s["shape"])):
                problems.append(f"{key!r}: {s['file']} does not hold the slice of shape {tuple(s['shape'])} the "
                                f"manifest lists (it holds {None if spec is None else spec.shape})")
    done.append(f"{len(m['tensors'])} tensors covered exactly once by their slices")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} failed verification ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    return done
