"""Structured configs: the typed schema behind `conf/`, registered in Hydra's ConfigStore.

Only the entry point sees the Hydra ``DictConfig``; it converts it to `Config` with
`to_config`, and everything below takes typed objects.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from engine.compile import BACKENDS as COMPILE_BACKENDS
from engine.pipeline.generators import SCHEDULES, check_schedule_name
from models.config import ModelConfig
from models.llama import RECOMPUTE_MODES


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
    max_skipped_steps: int = 5  # consecutive non-finite steps (update skipped) before the run stops with an error
    check_targets: bool = False  # debug: check each step's targets on the device (one extra host read per step)
    compile: bool = False  # torch.compile each transformer block (engine/compile.py)
    compile_backend: str = "inductor"  # inductor | aot_eager (traced, no code generation: fast to compile)


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
    p2p_dtype: str = "fp32"  # pipeline activations/gradients on the wire: fp32, or bf16 (needs precision=bf16)
    trace_steps: Optional[list[int]] = None  # [a, b]: the measured pipeline action timeline of steps a..b (pp > 1)


ZERO_MODES = (0, 1, 2)  # optim.zero; docs/parallelism.md


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
    force: bool = False  # scripts/prepare_data.py: replace an already prepared data.dir


@dataclass
class CheckpointSchema:
    interval: int = 0
    resume: Optional[str] = None
    load: Optional[str] = None
    keep_last: int = 3  # newest checkpoints of this history kept; 0 keeps all
    overwrite: bool = False  # a fresh start may discard the checkpoints already in run_dir
    allow_data_change: bool = False  # resume even though seed / batch / seq_len / data differ from the checkpoint
    async_save: bool = False  # write checkpoints in a background thread (`async` is a Python keyword)


@dataclass
class EvalSchema:
    interval: int = 0
    batches: int = 2


@dataclass
class MetricsSchema:
    tensorboard: bool = False  # also write metrics.jsonl's scalars to <run_dir>/tensorboard (pip install tensorboard)


@dataclass
class ProfileSchema:
    steps: Optional[list[int]] = None  # [a, b]: a torch.profiler Chrome trace per rank of steps a..b (1-based)


@dataclass
class PlannerSchema:
    """scripts/plan_stages.py only: how to cost the model and where to write the plan."""

    device: str = "h100"  # h100 | h100_pcie | h200 | a100 | cpu (engine/cost_model.py DEVICES)
    evaluate: bool = False  # no search: predict exactly the layout in parallel.*, optim.zero, precision, train.*
    gpus_per_node: int = 8  # GPUs per NVLink domain: a dp group inside one node reduces over NVLink, else the NICs
    profile: bool = False  # time the real layers on this machine instead of the analytic model
    profile_reps: int = 5
    profile_threads: Optional[int] = 1  # threads per rank in the planned run (torchrun on a CPU uses 1)
    mem_budget_gb: Optional[float] = None  # per device; default: the device's memory
    schedules: list[str] = field(default_factory=lambda: ["1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"])
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
    metrics: MetricsSchema = field(default_factory=MetricsSchema)
    profile: ProfileSchema = field(default_factory=ProfileSchema)
    run_dir: str = "runs/${model.name}"
    precision: str = "fp32"
    kernels: str = "auto"
    plan: Any = None  # a stage plan written by scripts/plan_stages.py (informational)
    planner: PlannerSchema = field(default_factory=PlannerSchema)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="tandem_schema", node=Config)
    cs.store(group="model", name="tandem_model_schema", node=ModelSchema)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and the fix. Entry points print it as
    ``error: ...`` and exit 2."""


def _unknown_keys(node, schema, prefix: str = "") -> list[str]:
    """Keys of a composed config the schema does not have (Hydra accepts ``+group.key=...`` and
    `to_object` would silently drop it)."""
    names = {f.name: f for f in fields(schema)}
    out = []
    for k in node.keys():
        if k == "hydra":
            continue
        if k not in names:
            out.append(prefix + str(k))
            continue
        child = node._get_node(k)
        sub = names[k].default_factory if names[k].default_factory is not dataclasses.MISSING else None
        if isinstance(child, DictConfig) and sub is not None and is_dataclass(sub):
            out += _unknown_keys(child, sub, f"{prefix}{k}.")
    return out


def to_config(cfg) -> Config:
    """DictConfig (validated against the schema) -> plain typed `Config`. Unknown keys are an error."""
    unknown = _unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; see engine/config.py for the keys "
                          f"(a leading '+' does not make a key known)")
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    return obj


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, *, purpose: str = "train") -> None:
    """Every check that needs no model, data or process group, before any work; each error names
    the key and the fix. Shared by every entry point: ``purpose`` is train, prepare_data or plan."""
    t, p, o, c, e = cfg.train, cfg.parallel, cfg.optim, cfg.checkpoint, cfg.eval
    _need(cfg.precision in ("fp32", "bf16"), f"precision={cfg.precision!r} is not one of fp32, bf16")
    _need(cfg.kernels in ("auto", "triton", "torch"), f"kernels={cfg.kernels!r} is not one of auto, triton, torch")
    _need(p.recompute in RECOMPUTE_MODES,
          f"parallel.recompute={p.recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    _need(o.zero in ZERO_MODES, f"optim.zero={o.zero!r} is not one of {', '.join(map(str, ZERO_MODES))} (0: AdamW state "
          f"on every dp rank, 1: state sharded over dp, 2: gradients, state and fp32 master weights sharded over dp)")
    for key, v in (("train.global_batch_size", t.global_batch_size), ("train.seq_len", t.seq_len),
                   ("parallel.micro_batch_size", p.micro_batch_size), ("train.max_steps", t.max_steps),
                   ("train.log_interval", t.log_interval), ("train.max_skipped_steps", t.max_skipped_steps),
                   ("eval.batches", e.batches), ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                   ("parallel.virtual_stages", p.virtual_stages)):
        _need(v >= 1, f"{key}={v} must be at least 1")
    _need(isinstance(t.check_targets, bool), f"train.check_targets={t.check_targets!r} must be true or false")
    _need(t.compile_backend in COMPILE_BACKENDS,
          f"train.compile_backend={t.compile_backend!r} is not one of {', '.join(COMPILE_BACKENDS)}")
    _need(p.dp is None or p.dp >= 1, f"parallel.dp={p.dp} must be at least 1 (or unset: world / (tp × pp))")
    _need(t.global_batch_size % p.micro_batch_size == 0,
          f"train.global_batch_size={t.global_batch_size} is not divisible by parallel.micro_batch_size="
          f"{p.micro_batch_size}; change one so the batch splits into whole micro-batches")
    try:
        check_schedule_name(p.schedule)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _need(p.layers_per_stage is None or p.pp > 1,
          f"parallel.layers_per_stage={p.layers_per_stage} needs parallel.pp > 1; drop it for pp=1")
    _need(p.p2p_dtype in ("fp32", "bf16"), f"parallel.p2p_dtype={p.p2p_dtype!r} is not one of fp32, bf16")
    _need(p.p2p_dtype == "fp32" or cfg.precision == "bf16",
          f"parallel.p2p_dtype={p.p2p_dtype} needs precision=bf16 (under fp32 the activations are fp32); set "
          f"precision=bf16 or parallel.p2p_dtype=fp32")
    _need(p.p2p_dtype == "fp32" or p.pp > 1,
          f"parallel.p2p_dtype={p.p2p_dtype} needs parallel.pp > 1 (it is the dtype of the activations sent between "
          f"pipeline stages; pp=1 sends none); drop it for pp=1")
    _need(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be positive (seconds a collective may wait)")
    _need(o.lr >= 0, f"optim.lr={o.lr} must not be negative")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be within [0, 1]")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must not be negative")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must not be negative")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must be in [0, 1)")
    _need(o.eps > 0, f"optim.eps={o.eps} must be positive")
    _need(o.clip_grad >= 0, f"optim.clip_grad={o.clip_grad} must not be negative (0 disables clipping)")
    _need(c.interval >= 0, f"checkpoint.interval={c.interval} must not be negative (0 saves only when stopping)")
    _need(c.keep_last >= 0, f"checkpoint.keep_last={c.keep_last} must not be negative (0 keeps every checkpoint)")
    _need(e.interval >= 0, f"eval.interval={e.interval} must not be negative (0 disables periodic eval)")
    _need(t.stop_at is None or 1 <= t.stop_at <= t.max_steps,
          f"train.stop_at={t.stop_at} must be within 1..train.max_steps={t.max_steps}")
    _need(not (c.resume and c.load), f"checkpoint.resume={c.resume!r} and checkpoint.load={c.load!r} are both set; "
          f"resume continues a run (weights, optimizer, step), load starts a new one from weights: set one")
    _need(not (c.overwrite and c.resume), "checkpoint.overwrite=true with checkpoint.resume: resuming keeps the "
          "checkpoints; drop one of them")
    _need(bool(cfg.data.dir), "data.dir is empty; set it to a prepared data directory (or where to prepare one)")
    _need(not Path(cfg.data.dir).exists() or Path(cfg.data.dir).is_dir(),
          f"data.dir={cfg.data.dir!r} exists and is not a directory; point data.dir at a directory")
    if purpose == "train":
        validate_observability(cfg)
    if purpose == "plan":
        validate_planner(cfg)


def validate_observability(cfg: Config) -> None:
    trace = cfg.parallel.trace_steps
    _need(trace is None or (len(trace) == 2 and 1 <= trace[0] <= trace[1] <= cfg.train.max_steps),
          f"parallel.trace_steps={None if trace is None else list(trace)} must be [first, last] with 1 <= first <= "
          f"last <= train.max_steps={cfg.train.max_steps} (1-based step numbers, as in metrics.jsonl)")
    _need(trace is None or cfg.parallel.pp > 1,
          f"parallel.trace_steps needs parallel.pp > 1 (it records the pipeline's actions); at pp=1 use "
          f"profile.steps={list(trace) if trace else None} for a profiler trace")
    steps = cfg.profile.steps
    _need(steps is None or (len(steps) == 2 and 1 <= steps[0] <= steps[1] <= cfg.train.max_steps),
          f"profile.steps={None if steps is None else list(steps)} must be [first, last] with 1 <= first <= last <= "
          f"train.max_steps={cfg.train.max_steps} (1-based step numbers, as in metrics.jsonl)")
    _need(not cfg.metrics.tensorboard or importlib.util.find_spec("tensorboard") is not None,
          "metrics.tensorboard=true but the tensorboard package is not installed; `pip install tensorboard` "
          "(or `pip install -e '.[tensorboard]'`), or set metrics.tensorboard=false")


def validate_planner(cfg: Config) -> None:
    pc = cfg.planner
    unknown = [s for s in pc.schedules if s not in SCHEDULES]
    _need(not unknown and pc.schedules, f"planner.schedules={list(pc.schedules)} must be a non-empty list of "
          f"{', '.join(SCHEDULES)}")
    _need(all(v >= 1 for v in pc.virtual_stages), f"planner.virtual_stages={list(pc.virtual_stages)} must be >= 1")
    _need(pc.micro_batch_sizes is None or all(v >= 1 for v in pc.micro_batch_sizes),
          f"planner.micro_batch_sizes={pc.micro_batch_sizes} must be positive")
    _need(pc.mem_budget_gb is None or pc.mem_budget_gb > 0, f"planner.mem_budget_gb={pc.mem_budget_gb} must be positive")
    _need(pc.profile_reps >= 1, f"planner.profile_reps={pc.profile_reps} must be at least 1")
    _need(pc.profile_threads is None or pc.profile_threads >= 1,
          f"planner.profile_threads={pc.profile_threads} must be at least 1")
    _need(pc.gpus_per_node >= 1, f"planner.gpus_per_node={pc.gpus_per_node} must be at least 1")


def writable_destination(path: str | Path, key: str) -> None:
    """An output path (file or directory) that can be created: its nearest existing ancestor is a
    writable directory."""
    p = Path(path).absolute()
    existing = next(q for q in [p, *p.parents] if q.exists())
    if existing == p:
        existing = p.parent if not p.is_dir() else p
    _need(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
          f"{key}={str(path)!r} cannot be written: {str(existing)!r} is not a writable directory; choose another path")
