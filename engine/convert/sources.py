"""Reading checkpoints one tensor (or one region of a tensor) at a time.

`TandemSource` assembles any region of a global tensor from the slices that overlap it, whatever
layout saved them; `HFSource` reads a Hugging Face Llama directory, sharded or single-file. Both
check what they can before any data moves: files present, shapes as the config implies.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.checkpoint import CheckpointError
from engine.convert.names import from_hf_name, model_config_from_hf, param_shapes
from engine.convert.stream import dtype_from_name, read_header, read_into, read_tensor
from models.config import ModelConfig


class TandemSource:
    """A Tandem checkpoint directory. ``verify=True`` checks every file's checksum first."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{str(self.path)!r} does not exist or is not a directory; pass a checkpoint "
                                  f"directory (…/checkpoints/step_XXXXXX)")
        self.manifest = ckpt.read_manifest(self.path)
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        if verify:
            ckpt.verify_files(self.path, self.manifest, self.manifest["files"])
        self.model_config = ModelConfig.from_dict(self.manifest["model_config"])
        for key, info in self.tensors.items():
            problems = slice_problems(key, info)
            if problems:
                raise CheckpointError(f"checkpoint {str(self.path)!r} is damaged: {problems[0]}; run "
                                      f"`convert_checkpoint.py verify` on it for the full list")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["global_shape"])

    def dtype(self, key: str) -> torch.dtype:
        return dtype_from_name(self.tensors[key]["dtype"])

    def read(self, key: str, offset: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None,
             ) -> torch.Tensor:
        """The region (offset, shape) of global tensor ``key`` (the whole tensor by default)."""
        info = self.tensors[key]
        gshape = tuple(info["global_shape"])
        offset = tuple(offset) if offset is not None else (0,) * len(gshape)
        shape = tuple(shape) if shape is not None else gshape
        out = torch.empty(shape, dtype=self.dtype(key))
        covered = 0
        for s in info["slices"]:
            box = ckpt._overlap(offset, shape, s["offset"], s["shape"])
            if box is None:
                continue
            src = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, s["offset"]))
            dst = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offset))
            read_into(self.path / s["file"], key, src, out[dst])
            covered += int(torch.Size([hi - lo for lo, hi in box]).numel())
        if covered != out.numel():
            raise CheckpointError(f"checkpoint {str(self.path)!r}: the slices of {key!r} cover {covered} of the "
                                  f"{out.numel()} elements needed (gaps or overlaps); it is damaged — run "
                                  f"`convert_checkpoint.py verify` on it")
        return out


def slice_problems(key: str, info: dict) -> list[str]:
    """What is wrong with the slices the manifest lists for ``key``: out of bounds, overlapping,
    or not covering the global tensor (in-bounds disjoint slices cover it iff their sizes add up)."""
    gshape = tuple(info["global_shape"])
    problems, boxes = [], []
    for s in info["slices"]:
        off, shp = tuple(s["offset"]), tuple(s["shape"])
        if len(off) != len(gshape) or any(o < 0 or o + n > g for o, n, g in zip(off, shp, gshape)):
            problems.append(f"{key!r}: slice {off}+{shp} in {s['file']} lies outside its global shape {gshape}")
            continue
        problems += [f"{key!r}: slices {o}+{n} and {off}+{shp} overlap" for o, n in boxes
                     if ckpt._overlap(off, shp, o, n) is not None]
        boxes.append((off, shp))
    held, need = sum(torch.Size(b[1]).numel() for b in boxes), torch.Size(gshape).numel()
    if held < need and not problems:
        problems.append(f"{key!r}: its slices hold {held} of {need} elements; part of the tensor is missing")
    return problems


def _load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({e})") from None


class HFSource:
    """A Hugging Face Llama directory: ``config.json`` plus ``model.safetensors`` or shards with
    ``model.safetensors.index.json``. ``names`` maps our parameter names to (file, HF name)."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{str(self.path)!r} is not a directory; pass a Hugging Face model directory")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{str(self.path)!r} has no config.json; it is not a Hugging Face model directory")
        self.hf_config = _load_json(cfg_path, "config")
        self.model_config = model_config_from_hf(self.hf_config, str(cfg_path))
        weight_map = self._weight_map()
        self.files: dict[str, dict] = {}
        for fname in sorted(set(weight_map.values())):
            f = self.path / fname
            if not f.is_file():
                raise CheckpointError(f"{str(self.path)!r} is missing the shard {fname} listed in its index; "
                                      f"download it again")
            self.files[fname], _ = read_header(f)
        self.names: dict[str, tuple[str, str]] = {}
        for hf_name, fname in weight_map.items():
            if hf_name not in self.files[fname]:
                raise CheckpointError(f"the index of {str(self.path)!r} puts {hf_name!r} in {fname}, which does "
                                      f"not hold it; the index and shards do not match")
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports include
                continue
            self.names[from_hf_name(hf_name)] = (fname, hf_name)
        self._check_shapes()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / self.INDEX
        if index.is_file():
            wm = _load_json(index, "index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{str(index)!r} has no weight_map; the index is damaged")
            return wm
        single = self.path / self.SINGLE
        if single.is_file():
            return {name: self.SINGLE for name in read_header(single)[0]}
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if shards:
            raise CheckpointError(f"{str(self.path)!r} has shards ({', '.join(shards[:3])}…) but no {self.INDEX}; "
                                  f"copy the index file too")
        raise CheckpointError(f"{str(self.path)!r} holds no {self.SINGLE} and no {self.INDEX}; only safetensors "
                              f"checkpoints are supported")

    def _check_shapes(self) -> None:
        cfg = self.model_config
        expected = param_shapes(cfg)
        if cfg.tie_embeddings and "output.weight" in self.names:
            # some exports store the tied head anyway; it must equal the embedding, which we keep
            del self.names["output.weight"]
        missing = [n for n in expected if n not in self.names]
        if missing:
            raise CheckpointError(f"{str(self.path)!r} lacks {len(missing)} tensor(s) its config implies, e.g. "
                                  f"{missing[0]!r}; the checkpoint is incomplete")
        extra = sorted(set(self.names) - set(expected))
        if extra:
            raise CheckpointError(f"{str(self.path)!r} holds tensor(s) a Llama of this config has no place for, "
                                  f"e.g. {self.names[extra[0]][1]!r}; check num_hidden_layers in config.json")
        for name, shape in expected.items():
            fname, hf_name = self.names[name]
            got = self.files[fname][hf_name].shape
            if tuple(got) != shape:
                raise CheckpointError(f"tensor {hf_name!r} has shape {tuple(got)} in {fname} but config.json implies "
                                      f"{shape}; the weights and config do not match")

    def dtype(self, name: str) -> torch.dtype:
        fname, hf_name = self.names[name]
        return self.files[fname][hf_name].dtype

    def read(self, name: str) -> torch.Tensor:
        fname, hf_name = self.names[name]
        return read_tensor(self.path / fname, hf_name)
