"""Tandem <-> Hugging Face Llama directories.

``to_hf``: any Tandem checkpoint (whatever layout saved it) -> ``model-0000k-of-0000n.safetensors``
shards, ``model.safetensors.index.json``, ``config.json`` (LlamaForCausalLM), ``generation_config.json``
and the tokenizer: ``tokenizer.json`` (copied, or built from the SentencePiece model) with its config. Tied embeddings the Hugging Face way: no
``lm_head.weight``, ``tie_word_embeddings: true``.

``from_hf``: a Hugging Face Llama directory -> a Tandem checkpoint that ``checkpoint.load=`` and
``train.eval_only=true`` accept under any layout (the loader reads overlapping slices).

Both stream: one tensor is in memory at a time.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer

from engine.checkpoint import CheckpointError, model_key, param_of, write_json_atomic
from engine.convert.names import hf_config, param_names, to_hf_name
from engine.convert.sources import HFSource, TandemSource
from engine.convert.stream import StreamWriter, TensorSpec, dtype_from_name, dtype_name
from engine.convert.writer import Region, pack, staged_output, write_tandem
from engine.data.errors import DataError
from engine.data.tokenizer import EOS_CANDIDATES, load_tokenizer, sentencepiece_to_hf

TOKENIZER, HF_TOKENIZER = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (HF_TOKENIZER, TOKENIZER)  # the Hugging Face form first: it is what transformers loads
# files of a Hugging Face tokenizer that travel along with it
TOKENIZER_EXTRAS = (HF_TOKENIZER, TOKENIZER, "tokenizer_config.json", "special_tokens_map.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int | None) -> int | None:
    """``5GB``, ``500MB``, ``64KiB``, a plain byte count -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise CheckpointError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 64KiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# -- tokenizer ---------------------------------------------------------------------------------
def find_tokenizer(src: TandemSource, explicit: str | Path | None) -> Path:
    """--tokenizer, else the one stored beside the checkpoint, else the recorded data dir's: a
    ``tokenizer.json`` or a SentencePiece ``tokenizer.model``."""
    if explicit is not None:
        p = Path(explicit)
        found = [p / n for n in TOKENIZER_FILES if (p / n).is_file()] if p.is_dir() else [p]
        if not found or not found[0].is_file():
            raise CheckpointError(f"--tokenizer {str(explicit)!r}: no tokenizer there; pass the {TOKENIZER} or "
                                  f"{HF_TOKENIZER} of the data directory the model was trained on")
        try:   # before any output is written: a file that does not load is not a tokenizer
            load_tokenizer(found[0])
        except DataError as e:
            raise CheckpointError(f"--tokenizer {str(explicit)!r} does not load as a tokenizer ({e}); pass the "
                                  f"{TOKENIZER} or {HF_TOKENIZER} of the data directory the model was trained on") from None
        return found[0]
    state = src.manifest.get("train_state", {})
    candidates = []
    if state.get("tokenizer"):
        candidates.append(src.path / state["tokenizer"])
    if state.get("data_dir"):
        candidates += [Path(state["data_dir"]) / n for n in TOKENIZER_FILES]
    for c in candidates:
        if c.is_file():
            return c
    tried = f" (tried {', '.join(map(str, candidates))})" if candidates else ""
    raise CheckpointError(f"no tokenizer for {str(src.path)!r}{tried}; pass --tokenizer PATH/{TOKENIZER} "
                          f"(the data directory's), or --no-tokenizer to write the weights only")


def write_tokenizer(tokenizer: Path, dst: Path, max_len: int) -> dict:
    """The tokenizer in the form ``AutoTokenizer`` loads with ``transformers`` and ``tokenizers`` alone: a
    ``tokenizer.json`` (copied, or built from the SentencePiece model, which is copied too) and its
    configs. Returns the special-token ids."""
    if tokenizer.suffix == ".json":
        return _copy_hf_tokenizer(tokenizer, dst, max_len)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    shutil.copy(tokenizer, dst / TOKENIZER)
    sentencepiece_to_hf(tokenizer.read_bytes()).save(str(dst / HF_TOKENIZER))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    tokens = {f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    write_json_atomic(dst / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **tokens, "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {}, "split_special_tokens": True})  # "<s>" in a text is text, as in SentencePiece
    write_json_atomic(dst / "special_tokens_map.json", tokens)
    return {k: (i if i >= 0 else None) for k, i in ids.items()}


def _copy_hf_tokenizer(tokenizer: Path, dst: Path, max_len: int) -> dict:
    """A run that used a Hugging Face tokenizer: copy it with the configs found beside it."""
    shutil.copy(tokenizer, dst / HF_TOKENIZER)
    cfg_path = tokenizer.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    cfg.setdefault("model_max_length", max_len)
    cfg.setdefault("split_special_tokens", True)  # as Tandem's data path encoded the training text
    tok = Tokenizer.from_file(str(tokenizer))
    if "eos_token" not in cfg:
        cfg["eos_token"] = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    write_json_atomic(dst / "tokenizer_config.json", cfg)
    if (tokenizer.parent / "special_tokens_map.json").is_file():
        shutil.copy(tokenizer.parent / "special_tokens_map.json", dst / "special_tokens_map.json")

    def token_id(key):
        t = cfg.get(f"{key}_token")
        t = t.get("content") if isinstance(t, dict) else t
        return tok.token_to_id(t) if t else None

    return {k: token_id(k) for k in ("bos", "eos", "unk", "pad")}


# -- to Hugging Face ---------------------------------------------------------------------------
def to_hf(src: str | Path, dst: str | Path, *, dtype: str | None = None, max_shard_size: str | int | None = "5GB",
          tokenizer: str | Path | None = None, with_tokenizer: bool = True, force: bool = False) -> Path:
    s = TandemSource(src)
    cfg = s.model_config
    names = param_names(cfg)
    missing = [n for n in names if model_key(n) not in s.tensors]
    if missing:
        raise CheckpointError(f"checkpoint {str(s.path)!r} has no tensor {model_key(missing[0])!r} (and "
                              f"{len(missing) - 1} more) that its model config implies; it is incomplete")
    out_dtype = dtype_from_name(dtype) if dtype else s.dtype(model_key(names[0]))
    tok = find_tokenizer(s, tokenizer) if with_tokenizer else None
    regions = [Region.full(n, s.shape(model_key(n)), out_dtype) for n in names]
    shards = pack(regions, parse_size(max_shard_size))
    with staged_output(dst, force=force) as tmp:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            w = StreamWriter(tmp / fname, [TensorSpec(to_hf_name(r.key), r.shape, r.dtype) for r in shard])
            for r in shard:
                w.write(to_hf_name(r.key), s.read(model_key(r.key)))
                weight_map[to_hf_name(r.key)] = fname
                total += r.nbytes
            w.close()
        write_json_atomic(tmp / HFSource.INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        ids = write_tokenizer(tok, tmp, cfg.max_seq_len) if tok else {"bos": None, "eos": None}
        write_json_atomic(tmp / "config.json", hf_config(cfg, dtype=dtype_name(out_dtype), bos_id=ids["bos"],
                                                         eos_id=ids["eos"]))
        gen = {"_from_model_config": True, **{f"{k}_token_id": ids[k] for k in ("bos", "eos") if ids[k] is not None}}
        write_json_atomic(tmp / "generation_config.json", gen)
    return Path(dst)


# -- from Hugging Face -------------------------------------------------------------------------
def from_hf(src: str | Path, dst: str | Path, *, dtype: str = "fp32", max_file_size: str | int | None = "5GB",
            force: bool = False) -> Path:
    """Weights are stored in ``dtype`` (fp32 by default: Tandem trains with fp32 master weights, and
    widening bf16/fp16 to fp32 is exact)."""
    h = HFSource(src)
    cfg = h.model_config
    out_dtype = dtype_from_name(dtype)
    shapes = {n: tuple(h.files[h.names[n][0]][h.names[n][1]].shape) for n in param_names(cfg)}
    regions = [Region.full(model_key(n), shp, out_dtype) for n, shp in shapes.items()]
    files = {f"part_{i:05d}.safetensors": f for i, f in enumerate(pack(regions, parse_size(max_file_size)))}
    state: dict = {"step": 0, "converted_from": str(Path(src).resolve())}
    with staged_output(dst, force=force) as tmp:
        # the source's tokenizer comes along, so continued pretraining can set data.tokenizer=DST
        for name in TOKENIZER_EXTRAS:
            if (h.path / name).is_file():
                shutil.copy(h.path / name, tmp / name)
        found = [n for n in TOKENIZER_FILES if (tmp / n).is_file()]
        if found:
            state["tokenizer"] = found[0]
        write_tandem(tmp, files, lambda r: h.read(param_of(r.key)).to(r.dtype),
                     model_config=cfg.to_dict(), layout={"tp": 1, "pp": 1, "dp": 1, "converted": "from-hf"},
                     train_state=state, step=0)
    return Path(dst)


def inspect_hf(src: str | Path) -> dict:
    """`inspect` for a Hugging Face directory: the model config it maps to and its tensors."""
    h = HFSource(src)
    rows = []
    for name, (fname, hf_name) in h.names.items():
        spec = h.files[fname][hf_name]
        rows.append({"key": hf_name, "shape": list(spec.shape), "dtype": dtype_name(spec.dtype), "slices": 1,
                     "bytes": spec.nbytes, "tandem_name": name})
    return {"path": str(h.path), "step": None, "model_config": h.model_config.to_dict(),
            "layout": {"format": "huggingface", "files": len(h.files)}, "train_state": {}, "tensors": rows,
            "n_tensors": len(rows), "n_params": sum(torch.Size(r["shape"]).numel() for r in rows),
            "tensor_bytes": sum(r["bytes"] for r in rows),
            "files": {f: (h.path / f).stat().st_size for f in h.files}}
