"""The one place where Hugging Face names meet ours: parameter names and the model config.

Hugging Face Llama applies rotary embeddings in the rotate-half form, as `models/llama.py` does,
so q and k projections map over unchanged — no head permutation (tests/unit/test_convert.py proves it
by comparing losses with transformers' own model).
"""
from __future__ import annotations

import re

from engine.checkpoint import CheckpointError
from models.config import ModelConfig

# (our parameter name, Hugging Face name); {i} is the global layer index.
_TABLE = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern(ours), hf) for ours, hf in _TABLE]
_FROM_HF = [(_pattern(hf), ours) for ours, hf in _TABLE]


def _map(name: str, table, what: str) -> str:
    for pat, template in table:
        m = pat.match(name)
        if m:
            return template.format(**m.groupdict())
    raise CheckpointError(f"no {what} name for parameter {name!r}; the checkpoint holds a tensor the "
                          f"Llama mapping does not know (a different architecture?)")


def to_hf_name(name: str) -> str:
    return _map(name, _TO_HF, "Hugging Face")


def from_hf_name(name: str) -> str:
    return _map(name, _FROM_HF, "Tandem")


def param_names(cfg: ModelConfig) -> list[str]:
    """Our parameter names of the whole model, in a stable order (embedding, layers, norm, head)."""
    names = ["tok_embeddings.weight"]
    for i in range(cfg.n_layers):
        names += [ours.format(i=i) for ours, _ in _TABLE if "{i}" in ours]
    names.append("norm.weight")
    if not cfg.tie_embeddings:
        names.append("output.weight")
    return names


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    hd, d = cfg.head_dim, cfg.dim
    per_layer = {"attention_norm.weight": (d,), "attention.wq.weight": (cfg.n_heads * hd, d),
                 "attention.wk.weight": (cfg.n_kv_heads * hd, d), "attention.wv.weight": (cfg.n_kv_heads * hd, d),
                 "attention.wo.weight": (d, cfg.n_heads * hd), "ffn_norm.weight": (d,),
                 "feed_forward.w1.weight": (cfg.ffn_dim, d), "feed_forward.w3.weight": (cfg.ffn_dim, d),
                 "feed_forward.w2.weight": (d, cfg.ffn_dim)}
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    for name in param_names(cfg):
        if name.startswith("layers."):
            shapes[name] = per_layer[name.split(".", 2)[2]]
    return {n: shapes[n] for n in param_names(cfg)}


def hf_config(cfg: ModelConfig, *, dtype: str, bos_id: int | None, eos_id: int | None) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` with our shape."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "pretraining_tp": 1, "use_cache": True, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "dtype": dtype, "torch_dtype": dtype,
    }


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our `ModelConfig` from a Hugging Face ``config.json``; anything we cannot run is an error."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise CheckpointError(f"{where} describes model_type={hf.get('model_type')!r}, architectures={archs}; only "
                              f"Llama (LlamaForCausalLM) checkpoints can be converted")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (Tandem's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}=true (Tandem's projections have no bias)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain rotary embeddings are implemented)")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']} (convert it with pretraining_tp=1)")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        problems.append(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = {dim // heads}")
    if problems:
        raise CheckpointError(f"{where}: this Llama variant is not supported: " + "; ".join(problems))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    try:
        return ModelConfig(dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
                           vocab_size=hf["vocab_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                           rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 2048),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"{where} lacks the key {e.args[0]!r}; it is not a complete Llama config") from None
