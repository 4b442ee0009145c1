"""The training loop: builds the mesh, the model chunks and the executor, then runs steps.

One step: this dp rank's rows of the step's global batch (a function of (seed, step)), run as
micro-batches (serially, or through the pipeline schedule), gradients are synchronized
(tp, tied embeddings, dp), clipped by the global norm, and AdamW steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine import run_dir as rundir
from engine.checkpoint_saver import Checkpointer
from engine.compile import compile_blocks, compiler_problem
from engine.config import Config, ConfigError, validate
from engine.data import DataError, DataMix, open_sources
from engine.data.device import local_batch
from engine.data.prepare import prepare_once
from engine.data_parallel import OverlappedGradReducer
from engine.hang import HangReporter
from engine.mesh import Mesh, build_mesh, init_distributed
from engine.pipeline.generators import schedule_placement
from engine.memory import launch_report
from engine.metrics import MetricsLog, PeakMemory, device_peak_flops
from engine.optim import clip_grad_norm, lr_at, param_refs
from engine.pipeline.trace import StepTracer
from engine.profiling import StepProfiler
from engine.pipeline import (PipelineRunner, StepActions, build_stage_chunks, build_step_actions, stage_layer_ranges,
                             sync_tied_grads)
from engine.recompute import apply_recompute
from engine.tensor_parallel import parallelize, sync_tp_grads, validate_tp
from engine.zero import build_dp_optimizer, zero_bucket_key
from kernels.cross_entropy import check_target_ids
from models import Llama, ModelConfig, init_weights


class SerialExecutor:
    """Runs a step's micro-batches one after another on a single chunk (pp = 1)."""

    def __init__(self, model: nn.Module, n_microbatches: int):
        self.model = model
        self.n_micro = n_microbatches

    def forward_backward(self, inputs, targets, *, backward: bool = True):
        total = torch.zeros((), device=inputs.device)
        for x, y in zip(inputs.chunk(self.n_micro), targets.chunk(self.n_micro)):
            with contextlib.nullcontext() if backward else torch.no_grad():
                loss = self.model(x, y)
            if backward:
                (loss / self.n_micro).backward()
            total += loss.detach()
        return total / self.n_micro


class StopSignal:
    """Records SIGTERM / SIGINT; ranks agree on stopping at the next step boundary. A second SIGINT
    exits at once (exit code 130), even while the main thread is blocked inside a collective: the
    interpreter's C-level handler writes every signal to a wake-up pipe, which a watcher thread
    reads, so neither signal waits for the main thread to get back to Python code."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.interrupts = 0
        self._previous = {}
        self._pipe = None
        self._old_wakeup = -1

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)
        threading.Thread(target=self._watch, args=(r,), name="stop-signal", daemon=True).start()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        r, w = self._pipe
        os.close(w)  # the watcher reads EOF and ends; it closes r

    def _handle(self, signum, frame):  # the Python-level handler; the watcher did the counting
        self.requested = True

    def _watch(self, r: int) -> None:
        try:
            while data := os.read(r, 64):
                for signum in data:
                    if signum in self.SIGNALS:
                        self.requested = True
                    if signum == signal.SIGINT:
                        self.interrupts += 1
                        if self.interrupts >= 2:
                            os.write(2, b"\nsecond interrupt: exiting now, without saving\n")
                            os._exit(130)
        finally:
            os.close(r)


def resolve_model_config(cfg: Config, source: Path | None, manifest: dict | None) -> ModelConfig:
    """The model shape: from the manifest of checkpoint ``source`` when loading one, else the preset +
    overrides. A ``model.<field>`` or a ``model=<preset>`` that contradicts the checkpoint is an error."""
    if source is None:
        return cfg.model.build()
    saved = manifest["model_config"]
    clash = {k: (v, saved[k]) for k, v in cfg.model.overrides().items() if saved.get(k) != v}
    if clash:
        detail = ", ".join(f"model.{k}={v} but the checkpoint has {s}" for k, (v, s) in clash.items())
        raise ConfigError(f"{detail}; drop the model.* override (the shape comes from the checkpoint)")
    saved_name = manifest.get("train_state", {}).get("model_name")
    if saved_name is not None and saved_name != cfg.model.name:
        preset = ModelConfig.from_name(cfg.model.name).to_dict()
        differ = sorted(k for k in preset if k in saved and preset[k] != saved[k])
        if differ:
            raise ConfigError(
                f"model={cfg.model.name} but checkpoint {str(source)!r} was saved from model={saved_name} with "
                f"another shape ({', '.join(f'{k} {saved[k]} vs {preset[k]}' for k in differ)}); "
                f"use model={saved_name}")
    return ModelConfig.from_dict(saved)


def rank0_then_agree(fn, *, rank: int):
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception (so a
    failure there does not leave the others waiting at the next collective)."""
    box = [None, None]
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[1] = e
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


# what a resume compares between the checkpoint's train_state and this launch (key -> config key)
DATA_SETTINGS = {"data_seed": "train.seed", "global_batch_size": "train.global_batch_size", "seq_len": "train.seq_len",
                 "data_dir": "data.dir"}


def data_settings(cfg: Config, data: DataMix | None = None) -> dict:
    """What decides the token order of every step; recorded in each checkpoint's train_state.
    ``data.workers`` is left out: the prepared bytes are the same for any number of workers."""
    d = cfg.data
    out = {"data_seed": cfg.train.seed, "global_batch_size": cfg.train.global_batch_size,
           "seq_len": cfg.train.seq_len, "data_dir": str(Path(d.sources[0] if d.sources else d.dir).resolve()),
           "data": {k: v for k, v in asdict(d).items() if k not in ("dir", "force", "workers")}}
    if data is not None:   # what each prepared source holds, so a re-prepared directory is noticed too
        out["data_meta"] = [{k: s.meta[k] for k in ("corpus", "train_tokens", "val_tokens", "vocab_size") if k in s.meta}
                            for s in data.sources]
    return out


def data_changes(saved: dict, now: dict) -> list[str]:
    """The settings (config keys) whose recorded value differs; keys the checkpoint lacks are skipped."""
    changed = [f"{key}={now[k]!r} (checkpoint: {saved[k]!r})" for k, key in DATA_SETTINGS.items()
               if k in saved and saved[k] != now[k]]
    for k, v in now["data"].items():
        if k in saved.get("data", {}) and saved["data"][k] != v:
            changed.append(f"data.{k}={v!r} (checkpoint: {saved['data'][k]!r})")
    if "data_meta" in saved and "data_meta" in now and saved["data_meta"] != now["data_meta"]:
        changed.append(f"the prepared data in data.dir ({now['data_meta']} vs the checkpoint's {saved['data_meta']})")
    return changed


def ensure_data(cfg: Config, mesh: Mesh, vocab_size: int) -> DataMix:
    """``data.sources`` (prepared directories) blended by ``data.weights``; or ``data.dir``, which rank 0
    prepares from ``data.corpus`` if needed while the other ranks wait for it."""
    d = cfg.data
    if d.sources:
        return open_sources(list(d.sources), d.weights, vocab_size=vocab_size)
    prepare_once(d.dir, rank=mesh.rank, barrier=dist.barrier, corpus=d.corpus, vocab_size=vocab_size,
                 tokenizer=d.tokenizer, text_key=d.text_key, workers=d.workers, skip_bad=d.skip_bad,
                 val_fraction=d.val_fraction)
    return open_sources([d.dir], d.weights, vocab_size=vocab_size)


def build_chunks(cfg: Config, mcfg: ModelConfig, mesh: Mesh) -> list[nn.Module]:
    p = cfg.parallel
    if mesh.pp == 1:
        if p.virtual_stages != 1:
            raise ValueError("parallel.virtual_stages > 1 needs parallel.pp > 1")
        with torch.device("meta"):
            chunks = [Llama(mcfg, kernels=cfg.kernels)]
    else:
        chunks = build_stage_chunks(mcfg, mesh, layers_per_stage=p.layers_per_stage,
                                    virtual_stages=p.virtual_stages, kernels=cfg.kernels)
    if mesh.tp > 1:
        for c in chunks:
            parallelize(c, mesh, sequence_parallel=p.sequence_parallel)
    for c in chunks:
        init_weights(c, seed=cfg.train.seed, n_layers=mcfg.n_layers, device=mesh.device)
        apply_recompute(c, p.recompute)
        if cfg.train.compile:   # lazily: the first call traces, after the pipeline has set up its state
            compile_blocks(c, backend=cfg.train.compile_backend, seq_len=cfg.train.seq_len, device=mesh.device)
    return chunks


def build_executor(cfg: Config, mcfg: ModelConfig, mesh: Mesh, chunks, n_micro: int,
                   step_actions: StepActions | None = None, dtype: torch.dtype = torch.float32):
    """The serial executor for pp=1, else a PipelineRunner over `step_actions` (the launch's proven
    lists, `build_step_actions`; required when pp > 1)."""
    if mesh.pp == 1:
        return SerialExecutor(chunks[0], n_micro)
    t_local = cfg.train.seq_len // mesh.tp if cfg.parallel.sequence_parallel else cfg.train.seq_len
    if cfg.parallel.p2p_dtype == "bf16":
        dtype = torch.bfloat16
    return PipelineRunner(chunks, mesh, step_actions,
                          hidden_shape=(cfg.parallel.micro_batch_size, t_local, mcfg.dim), dtype=dtype)


def sync_grads(chunks, mesh: Mesh, dp_reducer: OverlappedGradReducer) -> None:
    """After all micro-batches: dp averaging first (its all-reduces are mostly in flight already;
    every sync here is a linear map, so the order does not change the result), then tp and pp."""
    dp_reducer.finish()
    if mesh.tp > 1:
        sync_tp_grads(chunks, mesh)
    if mesh.pp > 1:
        sync_tied_grads(chunks, mesh)
    dp_reducer.finish_late()   # ZeRO-2: the buckets a reduce-scatter may only take after those sums


def precision_warnings(precision: str, device: torch.device, mcfg: ModelConfig) -> list[str]:
    """Settings that run, but slowly, on this device."""
    out = []
    if precision == "fp32" and device.type == "cuda" and mcfg.n_kv_heads != mcfg.n_heads:
        # SDPA's flash and memory-efficient kernels take no float32 grouped-query attention, so it
        # falls back to the math path: K/V repeated per query head and the T×T scores materialized
        out.append(f"precision=fp32 with grouped-query attention (model.n_heads={mcfg.n_heads}, model.n_kv_heads="
                   f"{mcfg.n_kv_heads}) runs attention on SDPA's slow math path on CUDA (K/V repeated per query "
                   f"head, T×T scores in memory); use precision=bf16")
    return out


# the phases in which the executor runs its schedule, by `backward`; a rank that times out in one of
# them reports the schedule action it was on
_SCHEDULE_PHASES = {True: "forward/backward", False: "evaluation forward"}


class Trainer:
    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        p = cfg.parallel
        init_distributed(timeout_s=p.timeout_s)
        self.mesh = mesh = build_mesh(tp=p.tp, pp=p.pp, dp=p.dp, placement=schedule_placement(p.schedule))
        g, mb = cfg.train.global_batch_size, p.micro_batch_size
        if g % (mb * mesh.dp):
            raise ConfigError(
                f"train.global_batch_size={g} is not divisible by parallel.micro_batch_size={mb} × dp={mesh.dp}; "
                f"change train.global_batch_size or parallel.micro_batch_size")
        self.n_micro = g // (mb * mesh.dp)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.lock = rundir.RunLock(self.run_dir)
        self._made_dirs = rundir.created_dirs(self.run_dir)
        self.saver = None
        try:
            rank0_then_agree(self._claim_run_dir, rank=mesh.rank)
            self._setup()
        except BaseException:
            self.close()
            raise

    def _claim_run_dir(self) -> None:
        """Rank 0: the run directory is writable, one launch holds it, a crash's leftovers are tidied."""
        existing = next(p for p in [self.run_dir.absolute(), *self.run_dir.absolute().parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"run_dir={self.cfg.run_dir!r} cannot be created: {str(existing)!r} is not a writable "
                              f"directory; choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        ckpt.recover(self.ckpt_root)

    def _setup(self) -> None:
        cfg, mesh, p, c = self.cfg, self.mesh, self.cfg.parallel, self.cfg.checkpoint
        # each manifest is read once: rank 0 finds (and checksums) the resume point and hands every
        # rank its manifest; the model shape, the resume step, the data check and the restore use it
        self.resume_from, resume_manifest = rank0_then_agree(lambda: ckpt.find(self.ckpt_root, c.resume),
                                                             rank=mesh.rank)
        # checkpoint.load=init names the seeded initialization explicitly (evaluating it is then intended)
        self.load_from, load_manifest = (ckpt.find(self.ckpt_root, c.load) if c.load and c.load != "init"
                                         else (None, None))
        source = self.resume_from or self.load_from
        self.source_manifest = resume_manifest if self.resume_from is not None else load_manifest
        if cfg.train.eval_only and source is None and c.load != "init":
            raise ConfigError("train.eval_only=true but there is no checkpoint to evaluate (checkpoint.resume found "
                              "none, checkpoint.load is unset); set checkpoint.load=<step dir>, checkpoint.resume, "
                              "or checkpoint.load=init to evaluate the initialization on purpose")
        if not cfg.train.eval_only:
            rank0_then_agree(self._check_fresh_start, rank=mesh.rank)
        self.mcfg = resolve_model_config(cfg, source, self.source_manifest)
        if cfg.train.seq_len > self.mcfg.max_seq_len:
            raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={self.mcfg.max_seq_len}")
        try:  # before any data or model work: a shape the mesh cannot split is a launch error
            if cfg.train.compile and (problem := compiler_problem(cfg.train.compile_backend, mesh.device)):
                raise ConfigError(problem)
            if mesh.tp > 1:
                validate_tp(self.mcfg, mesh.tp, seq_len=cfg.train.seq_len, sequence_parallel=p.sequence_parallel)
            self.step_actions = None
            if mesh.pp > 1:   # the schedule is checked, built and proven here, once per launch
                stage_layer_ranges(self.mcfg.n_layers, mesh.pp, p.virtual_stages, p.layers_per_stage)
                self.step_actions = build_step_actions(p.schedule, mesh.pp, self.n_micro, p.virtual_stages)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.step = 0
        if self.resume_from is not None:
            self.step = int(self.source_manifest["train_state"]["step"])
            if self.step >= cfg.train.max_steps and not cfg.train.eval_only:
                raise ConfigError(f"checkpoint {str(self.resume_from)!r} is at step {self.step}, not before "
                                  f"train.max_steps={cfg.train.max_steps}; raise train.max_steps to train on")
        self.data = ensure_data(cfg, mesh, self.mcfg.vocab_size)
        if cfg.eval.interval or cfg.train.eval_only:   # on every rank: a rank reads only its slice at eval time
            self.data.check_eval(cfg.eval.batches, batch_size=cfg.train.global_batch_size, seq_len=cfg.train.seq_len)
        if self.resume_from is not None and not cfg.train.eval_only:
            self._check_data_settings(self.source_manifest["train_state"])
        self.chunks = build_chunks(cfg, self.mcfg, mesh)
        # precision=bf16 with ZeRO-2: bf16 parameters (and pipeline messages); the fp32 master weights
        # live only in the optimizer's dp slices (engine/zero.py)
        bf16_params = cfg.precision == "bf16" and cfg.optim.zero == 2 and mesh.dp > 1
        # the fp32 initialization, kept until the optimizer has taken its master slices from it
        master_init = {id(p): p.detach() for c in self.chunks for p in c.parameters()} if bf16_params else None
        for chunk in self.chunks if bf16_params else ():
            chunk.to(torch.bfloat16)
        self.executor = build_executor(cfg, self.mcfg, mesh, self.chunks, self.n_micro, self.step_actions,
                                       dtype=torch.bfloat16 if bf16_params else torch.float32)
        o = cfg.optim
        self.refs = param_refs(self.chunks)
        self.dp_reducer, self.optimizer = build_dp_optimizer(self.refs, self.chunks, mesh, self.n_micro, zero=o.zero,
                                                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                                             weight_decay=o.weight_decay, master_init=master_init)
        del master_init
        if isinstance(self.executor, PipelineRunner):   # deferred (zero-bubble) W's reach the dp reducer as they run
            self.executor.store.on_grad.append(self.dp_reducer.on_deferred_grad)
        self.memory, report = launch_report(self.refs, self.chunks, mesh, zero=o.zero,
                                            bucket_key=zero_bucket_key(self.chunks, mesh) if o.zero == 2 else None)
        if report is not None:
            print(report, flush=True)
        self.phase = "setup"
        self.skipped_steps = 0
        self.log = MetricsLog(self.run_dir / "metrics.jsonl" if mesh.rank == 0 else None,
                              tensorboard_dir=self.run_dir / "tensorboard" if cfg.metrics.tensorboard else None,
                              purge_step=self.step + 1 if self.resume_from is not None and not cfg.train.eval_only
                              else None)   # eval_only truncates no history: nothing to purge
        self.peak_mem = PeakMemory(mesh.device)
        self.profiler = StepProfiler(cfg.profile.steps, run_dir=self.run_dir, rank=mesh.rank, device=mesh.device)
        self.tracer = StepTracer(cfg.parallel.trace_steps, run_dir=self.run_dir, mesh=mesh)
        self.peak_flops, self.peak_label = device_peak_flops(mesh.device)
        # bf16 compute under autocast (CUDA, or the CPU's own autocast, so CPU runs exercise the same
        # path); parameters, gradients, optimizer state and the loss stay float32
        self.autocast = (torch.autocast(mesh.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                         else contextlib.nullcontext())
        for warning in precision_warnings(cfg.precision, mesh.device, self.mcfg):
            if mesh.rank == 0:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        protect = (self.resume_from.name,) if self.resume_from is not None else ()
        self.saver = Checkpointer(self.ckpt_root, keep_last=c.keep_last, async_save=c.async_save, protect=protect)
        if source is not None:
            self._restore(source, self.source_manifest, with_optimizer=self.resume_from is not None)
        if not cfg.train.eval_only:
            rank0_then_agree(self._start_history, rank=mesh.rank)

    def _check_fresh_start(self) -> None:
        """Rank 0: a launch that does not resume must not silently overwrite a run's checkpoints."""
        if self.resume_from is not None:
            return
        found = ckpt.list_checkpoints(self.ckpt_root)
        if found and not self.cfg.checkpoint.overwrite:
            raise ConfigError(
                f"run_dir={self.cfg.run_dir!r} already holds checkpoints (newest {found[-1].name}); resume with "
                f"checkpoint.resume=auto, choose another run_dir, or set checkpoint.overwrite=true to discard them")

    def _check_data_settings(self, saved: dict) -> None:
        changed = data_changes(saved, data_settings(self.cfg, self.data))
        if changed and not self.cfg.checkpoint.allow_data_change:
            raise ConfigError(
                f"resuming {str(self.resume_from)!r} with other data settings than it was saved with: "
                f"{'; '.join(changed)}. The data order would silently change; restore them, or set "
                f"checkpoint.allow_data_change=true to continue with the new data")

    def _start_history(self) -> None:
        """Rank 0, when training: this run continues the history ending at ``self.step``. Later
        checkpoints move to ``abandoned/``; metrics of later steps are dropped. A fresh start with
        checkpoint.overwrite=true discards the old checkpoints only now, after every check passed."""
        if self.resume_from is None:
            for old in ckpt.list_checkpoints(self.ckpt_root):
                shutil.rmtree(old)
            (self.ckpt_root / "latest").unlink(missing_ok=True)
        moved = rundir.abandon_newer(self.ckpt_root, self.step)
        if moved:
            print(f"resumed from step {self.step}: moved the checkpoints of the abandoned later history to "
                  f"{moved[0].parent} ({', '.join(p.name for p in moved)}); resume=auto will not pick them",
                  flush=True)
        rundir.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    def close(self) -> None:
        """Release the run directory; a launch that failed before writing anything leaves no directory.
        Every part is closed even if another fails, and the lock is always released. Called while an
        exception propagates (a failed launch or step), a failure here is only reported, so it does not
        replace that error; otherwise the first one is raised after everything is closed."""
        failures = []
        try:
            for part in ("profiler", "log"):   # absent when the launch failed before creating them
                try:
                    if hasattr(self, part):
                        getattr(self, part).close()
                except Exception as e:  # noqa: BLE001 - closing goes on; raised or reported below
                    failures.append((part, e))
        finally:
            if self.mesh.rank == 0:
                try:
                    self.lock.release()
                    rundir.remove_if_empty(self._made_dirs)   # after the lock: its file is in the directory
                except Exception as e:  # noqa: BLE001
                    failures.append(("run directory lock", e))
        if not failures:
            return
        if sys.exc_info()[1] is None:
            raise failures[0][1]
        for part, e in failures:
            print(f"warning: closing the {part} after the error below failed too: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)

    def where(self) -> str:
        """What this rank is doing now, for the report of a timed-out or failed rank: the pipeline
        action it waits on when inside the schedule, else the phase of the step."""
        schedule = self.cfg.parallel.schedule
        gpu_at = self.executor.stuck_action() if hasattr(self.executor, "stuck_action") else None
        if gpu_at is not None:   # NCCL: the host ran ahead; name where the GPU is
            return f"{self.phase}, with the GPU still at pipeline action {gpu_at} of the {schedule} schedule"
        action = getattr(self.executor, "current_action", None)
        if self.phase in _SCHEDULE_PHASES.values() and action is not None:
            return f"pipeline action {action} of the {schedule} schedule"
        return self.phase

    # -- checkpoints ---------------------------------------------------------------------------
    def _model_entries(self, *, saving: bool = False):
        """The weights' entries; ZeRO-2 with bf16 parameters saves its fp32 master pieces instead of the
        bf16 parameters, and loads both."""
        separate = getattr(self.optimizer, "separate_master", False)   # not the master list: a rank may own none
        master = self.optimizer.master_entries(saving=saving) if separate else []
        params = [] if saving and separate else [ckpt.Entry(ckpt.model_key(r.name), r.param, r.meta) for r in self.refs]
        return params + master

    def save(self) -> Path:
        """Collective. With checkpoint.async_save this returns once the host copy is taken."""
        p = self.cfg.parallel
        layout = {"tp": self.mesh.tp, "pp": self.mesh.pp, "dp": self.mesh.dp, "virtual_stages": p.virtual_stages,
                  "layers_per_stage": p.layers_per_stage, "zero": self.cfg.optim.zero}
        state = {"step": self.step, "model_name": self.cfg.model.name, "skipped_steps": self.skipped_steps,
                 **data_settings(self.cfg, self.data), "data_sources": [str(s.dir.resolve()) for s in self.data.sources],
                 "data_weights": self.data.weights}
        self.phase = "checkpoint save"
        with torch.no_grad():
            return self.saver.save(self.step, self._model_entries(saving=True) + self.optimizer.state_entries(),
                                   model_config=self.mcfg.to_dict(), layout=layout, train_state=state)

    def _restore(self, path: Path, manifest: dict, *, with_optimizer: bool) -> None:
        entries = self._model_entries()
        if with_optimizer:
            self.step = int(manifest["train_state"]["step"])
            self.skipped_steps = int(manifest["train_state"].get("skipped_steps", 0))
            has_optim = any(k.startswith(ckpt.OPTIM) for k in manifest["tensors"])
            if has_optim:
                entries += self.optimizer.init_state_entries(self.step)
        ckpt.load(path, entries, manifest=manifest)
        if self.mesh.rank == 0:
            what = f"resumed at step {self.step}" if with_optimizer else "loaded weights"
            print(f"{what} from {path}", flush=True)

    # -- steps ---------------------------------------------------------------------------------
    def _forward_backward(self, read, *, backward: bool):
        """One step's micro-batches through the executor (forward only with ``backward=False``);
        ``read(first, count)`` gives rows of the step's global batch as (count, T + 1) windows, of which
        this rank reads only its dp slice (`engine.data.device`). Returns the local mean loss, or None
        off the last stage."""
        self.phase = _SCHEDULE_PHASES[backward]
        x, y = local_batch(read, self.mesh, self.cfg.train.global_batch_size)
        if self.cfg.train.check_targets and y is not None:   # debug only: a device->host read
            check_target_ids(y, self.mcfg.vocab_size)
        with self.autocast:
            loss = self.executor.forward_backward(x, y, backward=backward)
        return loss

    def _reduce_loss(self, loss, stop: bool = False, save_failed: bool = False,
                     peak_mib: float | None = None) -> torch.Tensor:
        """The loss lives on the last stage's dp × tp ranks: one all-reduce of [mean loss, stop flag,
        background-save failure flag] (float64, on the device) brings all three to every rank. With
        ``peak_mib`` (a host number) the buffer has a slot per global rank after them: each rank fills
        its own, so the same all-reduce gathers every rank's peak memory."""
        self.phase = "loss all-reduce"
        mesh = self.mesh
        buf = torch.zeros(3 + (mesh.world_size if peak_mib is not None else 0), dtype=torch.float64, device=mesh.device)
        if mesh.is_last_stage and loss is not None:
            buf[0] = loss.detach().double() / (mesh.dp * mesh.tp)   # stays on the device: no host read before the reduce
        buf[1] = float(stop)
        buf[2] = float(save_failed)
        if peak_mib is not None:
            buf[3 + mesh.rank] = peak_mib
        dist.all_reduce(buf)
        return buf

    def _global_mean(self, loss) -> float:
        return self._reduce_loss(loss)[0].item()

    def _step(self, stop_requested=False) -> tuple[torch.Tensor, float]:
        """The step's forward, backward and gradient work, without reading any value back: returns the
        device tensor [mean loss, stop flag, save-failed flag, peak MiB of each rank..., global gradient
        norm] and the learning
        rate. ``stop_requested`` (a bool, or a callable read at the step's end) is agreed across ranks
        in the loss all-reduce."""
        cfg = self.cfg
        t = cfg.train
        loss = self._forward_backward(lambda first, count: self.data.train_rows(
            self.step, seed=t.seed, batch_size=t.global_batch_size, seq_len=t.seq_len, first=first, count=count),
            backward=True)
        self.phase = "gradient synchronization (dp all-reduce, tp and tied-embedding sums)"
        sync_grads(self.chunks, self.mesh, self.dp_reducer)
        self.phase = "gradient-norm all-reduce"
        if getattr(self.optimizer, "sharded_grads", False):   # ZeRO-2: each rank holds its slice of the gradients
            grad_norm = self.optimizer.clip_grad_norm(cfg.optim.clip_grad, self.mesh.device)
        else:
            grad_norm = clip_grad_norm(self.refs, cfg.optim.clip_grad, self.mesh.device)
        lr = lr_at(self.step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        stop = stop_requested() if callable(stop_requested) else stop_requested
        save_failed = self.saver is not None and self.saver.failed.is_set()
        # the peak since the previous step's measurement: its optimizer step, this forward and backward
        peak = self.peak_mem.take()
        return torch.cat([self._reduce_loss(loss, stop, save_failed, peak), grad_norm.reshape(1)]), lr

    def train_step(self, stop_requested=False) -> dict:
        """One optimizer step. A non-finite loss or gradient norm (the same on every rank: both are
        global) skips the update."""
        cfg = self.cfg
        t0 = time.perf_counter()
        scalars, lr = self._step(stop_requested)
        loss_value, stop, save_failed, *peak_mib, grad_norm = scalars.tolist()   # the step's one host read
        stop, save_failed = stop > 0, save_failed > 0
        if save_failed:
            self.saver.wait()  # raises the background save's error, on every rank
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if not skipped:
            self.phase = "optimizer step (ZeRO broadcast)"
            self.optimizer.step(lr)
        self.optimizer.zero_grad()
        self.dp_reducer.zero_grad()   # dp > 1: the gradients are views into its persistent buckets again
        self.skipped_steps += skipped
        self.phase = "between steps"
        if self.mesh.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens_per_s = cfg.train.global_batch_size * cfg.train.seq_len / dt
        mfu = (tokens_per_s * self.mcfg.flops_per_token(cfg.train.seq_len) / (self.peak_flops * self.mesh.world_size)
               if self.peak_flops else None)
        samples = self.step * cfg.train.global_batch_size
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s, "step_time_s": dt, "mfu": mfu, "skipped": skipped,
                "skipped_steps": self.skipped_steps, **self.data.position(samples, cfg.train.seq_len),
                "tokens_seen": samples * cfg.train.seq_len, "peak_mem_mib": [round(m, 1) for m in peak_mib],
                "_stop": stop}

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg = self.cfg
        g = cfg.train.global_batch_size
        losses = []
        for b in range(cfg.eval.batches):
            read = lambda first, count, b=b: self.data.eval_rows(b * g + first, count, seq_len=cfg.train.seq_len)  # noqa: E731
            losses.append(self._global_mean(self._forward_backward(read, backward=False)))
        return sum(losses) / len(losses)

    def run(self) -> list[dict]:
        """Train to ``train.max_steps`` (or evaluate once with ``train.eval_only``); returns the records."""
        cfg, mesh = self.cfg, self.mesh
        records = []
        if mesh.rank == 0:
            print(f"{mesh}; model {self.mcfg.num_params() / 1e6:.2f}M params; {self.n_micro} micro-batches per step; "
                  f"{self.peak_label}", flush=True)
        if cfg.train.eval_only:
            ev = self.evaluate()
            if mesh.rank == 0:
                print(f"eval_loss {ev:.6f}", flush=True)
                self.log.write({"step": self.step, "eval_loss": ev})
            return [{"step": self.step, "eval_loss": ev}]
        with StopSignal() as stop:
            records = self._train_loop(stop)
            self.phase = "waiting for the last checkpoint save"
            self.saver.wait()  # a normal shutdown never leaves a save half-done
            return records

    def _train_loop(self, stop: StopSignal) -> list[dict]:
        cfg, mesh = self.cfg, self.mesh
        records = []
        bar = _progress(self.step, cfg.train.max_steps, enabled=mesh.rank == 0)
        consecutive_skips = 0
        while self.step < cfg.train.max_steps:
            tracing = self.executor.tracing = self.tracer.active(self.step + 1)
            with self.profiler.step(self.step + 1):
                rec = self.train_step(lambda: stop.requested)
            stopping = rec.pop("_stop") or self.step == cfg.train.stop_at
            if tracing:
                self.executor.tracing = False
                self.tracer.record(self.step, self.executor.trace_rows, self.executor.step_wall_start)
                if self.step == self.tracer.window[1] or stopping or self.step == cfg.train.max_steps:
                    path = self.tracer.finish()
                    if path is not None:
                        bar.write(f"pipeline trace of steps {self.tracer.window[0]}..{self.step} written to {path}")
            records.append(rec)
            consecutive_skips = consecutive_skips + 1 if rec["skipped"] else 0
            if rec["skipped"] and mesh.rank == 0:
                bar.write(f"step {self.step}: non-finite loss {rec['loss']} or gradient norm {rec['grad_norm']}; "
                          f"update skipped ({consecutive_skips} in a row)")
            if mesh.rank == 0 and consecutive_skips < cfg.train.max_skipped_steps:
                self.log.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.max_steps:
                    bar.write(_fmt(rec))
            if cfg.eval.interval and self.step % cfg.eval.interval == 0:
                ev = self.evaluate()
                records.append({"step": self.step, "eval_loss": ev})
                if mesh.rank == 0:
                    self.log.write(records[-1])
                    bar.write(f"step {self.step} eval_loss {ev:.4f}")
            if consecutive_skips >= cfg.train.max_skipped_steps:
                if mesh.rank == 0:
                    self.log.write(rec)
                raise TrainingDiverged(
                    f"{consecutive_skips} consecutive steps (up to step {self.step}) had a non-finite loss or "
                    f"gradient norm, so their updates were skipped (train.max_skipped_steps="
                    f"{cfg.train.max_skipped_steps}); resume from the last checkpoint with a lower optim.lr or "
                    f"stronger optim.clip_grad, or check the data")
            if stopping or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                path = self.save()
                if mesh.rank == 0:
                    bar.write(f"saved {path}")
            if stopping:
                if mesh.rank == 0:
                    bar.write(f"stop requested: saved at step {self.step}, exiting")
                break
        bar.close()
        return records


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


def _progress(start, total, enabled):
    return tqdm(initial=start, total=total, disable=not enabled, unit="step", dynamic_ncols=True)


def _fmt(rec: dict) -> str:
    mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    return (f"step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} grad_norm {rec['grad_norm']:.3f} "
            f"tokens/s {rec['tokens_per_s']:.0f} step {1000 * rec['step_time_s']:.0f} ms mfu {mfu} "
            f"peak mem {max(rec['peak_mem_mib']):.0f} MiB")


def main(cfg: Config) -> list[dict]:
    trainer = Trainer(cfg)
    mesh = trainer.mesh
    who = f"rank {mesh.rank} (pp {mesh.pp_rank}, dp {mesh.dp_rank}, tp {mesh.tp_rank})"
    reporter = HangReporter(lambda: f"step {trainer.step + 1}: {trainer.where()}", trainer.cfg.parallel.timeout_s,
                            prefix=f"{who} ").start()
    try:
        if mesh.rank == 0:
            (trainer.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        records = trainer.run()
        dist.barrier()
    except (ConfigError, DataError, ckpt.CheckpointError):
        raise  # a user error, reported by the entry point as `error: ...`
    except BaseException as e:
        # A hang surfaces here as a collective/p2p timeout (parallel.timeout_s). Say where this rank was,
        # then fail: torchrun sees a non-zero exit and stops the other ranks.
        print(f"\n{who} failed in step {trainer.step + 1} while waiting on {trainer.where()}: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        raise
    finally:
        reporter.stop()
        trainer.close()
    return records
