"""Structured configs: the typed schema behind `conf/`, registered in Hydra's ConfigStore.

Only the entry point sees the Hydra ``DictConfig``; it converts it to `Config` with
`to_config`, and everything below takes typed objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from models.config import ModelConfig


@dataclass
class ModelSchema:
    """A preset ``name`` plus optional per-field overrides (``model.n_layers=3``)."""

    name: str = "tiny"
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    vocab_size: Optional[int] = None
    norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None
    max_seq_len: Optional[int] = None
    tie_embeddings: Optional[bool] = None

    def overrides(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}

    def build(self) -> ModelConfig:
        return ModelConfig.from_name(self.name, **self.overrides())


@dataclass
class TrainSchema:
    max_steps: int = 200
    global_batch_size: int = 16
    seq_len: int = 128
    seed: int = 1337
    eval_only: bool = False
    log_interval: int = 10
    stop_at: Optional[int] = None  # stop (saving a checkpoint) at this step; the schedule still spans max_steps


@dataclass
class ParallelSchema:
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None
    micro_batch_size: int = 8
    schedule: str = "1f1b"
    virtual_stages: int = 1
    layers_per_stage: Optional[list[int]] = None
    sequence_parallel: bool = False
    recompute: str = "none"
    timeout_s: float = 1800.0


@dataclass
class OptimSchema:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    zero: int = 0


@dataclass
class DataSchema:
    dir: str = "data/stdlib"
    corpus: str = "stdlib"  # stdlib | a file | a directory | a glob; text, .jsonl, .jsonl.gz, .parquet
    tokenizer: Optional[str] = None  # a SentencePiece .model or a tokenizer.json; default: train one
    text_key: str = "text"  # the JSONL key / Parquet column holding the text
    workers: int = 1  # tokenizing processes while preparing; the output is the same for any number
    skip_bad: bool = False  # skip (and count) invalid JSON lines instead of stopping
    val_fraction: float = 0.01  # documents held out for validation
    sources: Optional[list[str]] = None  # prepared directories to blend; default: [data.dir]
    weights: Optional[list[float]] = None  # one positive weight per source; default: equal


@dataclass
class CheckpointSchema:
    interval: int = 0
    resume: Optional[str] = None
    load: Optional[str] = None
    keep_last: int = 3


@dataclass
class EvalSchema:
    interval: int = 0
    batches: int = 2


@dataclass
class PlannerSchema:
    """scripts/plan_stages.py only: how to cost the model and where to write the plan."""

    device: str = "h100"  # h100 | h200 | a100 | cpu (engine/planner.py DEVICES)
    profile: bool = False  # time the real layers on this machine instead of the analytic model
    profile_reps: int = 5
    profile_threads: Optional[int] = 1  # threads per rank in the planned run (torchrun on a CPU uses 1)
    mem_budget_gb: Optional[float] = None  # per device; default: the device's memory
    schedules: list[str] = field(default_factory=lambda: ["1f1b", "interleaved_1f1b", "zb_h1"])
    virtual_stages: list[int] = field(default_factory=lambda: [2])  # tried with interleaved schedules
    micro_batch_sizes: Optional[list[int]] = None  # default: every divisor of the per-dp batch
    out: Optional[str] = None  # <dir>/plan/<name>.yaml, loaded by `train.py --config-dir <dir> +plan=<name>`


@dataclass
class Config:
    model: ModelSchema = field(default_factory=ModelSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    data: DataSchema = field(default_factory=DataSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    run_dir: str = "runs/${model.name}"
    precision: str = "fp32"
    kernels: str = "auto"
    plan: Any = None  # a stage plan written by scripts/plan_stages.py (informational)
    planner: PlannerSchema = field(default_factory=PlannerSchema)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="tandem_schema", node=Config)
    cs.store(group="model", name="tandem_model_schema", node=ModelSchema)


def to_config(cfg) -> Config:
    """DictConfig (validated against the schema) -> plain typed `Config`."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    return obj


def validate(cfg: Config) -> None:
    """Checks that need no model or process group; each error names the key and the fix."""
    t, p = cfg.train, cfg.parallel
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={cfg.precision!r} is not one of fp32, bf16")
    if cfg.kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels={cfg.kernels!r} is not one of auto, triton, torch")
    if p.recompute not in ("none", "selective", "full"):
        raise ValueError(f"parallel.recompute={p.recompute!r} is not one of none, selective, full")
    if cfg.optim.zero not in (0, 1):
        raise ValueError(f"optim.zero={cfg.optim.zero} is not supported; use 0 or 1")
    for key, v in (("train.global_batch_size", t.global_batch_size), ("train.seq_len", t.seq_len),
                   ("parallel.micro_batch_size", p.micro_batch_size), ("train.max_steps", t.max_steps)):
        if v < 1 and not (key == "train.max_steps" and v == 0):
            raise ValueError(f"{key}={v} must be positive")
    if t.global_batch_size % p.micro_batch_size:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by parallel.micro_batch_size="
            f"{p.micro_batch_size}; change one so the batch splits into whole micro-batches")
