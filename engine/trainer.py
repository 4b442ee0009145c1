"""The training loop: builds the mesh, the model chunks and the executor, then runs steps.

One step: the step's global batch (a function of (seed, step)) is sliced by dp rank, run as
micro-batches (serially, or through the pipeline schedule), gradients are synchronized
(tp, tied embeddings, dp), clipped by the global norm, and AdamW steps.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine import checkpoint as ckpt
from engine.config import Config, validate
from engine.data import DataMix, open_sources
from engine.data.prepare import prepare_once
from engine.mesh import Mesh, build_mesh, init_distributed
from engine.metrics import MetricsLog, device_peak_flops
from engine.data_parallel import OverlappedGradReducer
from engine.optim import Optimizer, clip_grad_norm, lr_at, param_refs
from models import Llama, ModelConfig, init_weights


class SerialExecutor:
    """Runs a step's micro-batches one after another on a single chunk (pp = 1)."""

    def __init__(self, model: nn.Module, n_microbatches: int):
        self.model = model
        self.m = n_microbatches

    def forward_backward(self, inputs, targets, *, backward: bool = True):
        total = torch.zeros((), device=inputs.device)
        for x, y in zip(inputs.chunk(self.m), targets.chunk(self.m)):
            with contextlib.nullcontext() if backward else torch.no_grad():
                loss = self.model(x, y)
            if backward:
                (loss / self.m).backward()
            total += loss.detach()
        return total / self.m


class StopSignal:
    """Records SIGTERM / SIGINT; ranks agree on stopping at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True


def resolve_model_config(cfg: Config, source: Path | None) -> ModelConfig:
    """The model shape: from the checkpoint's manifest when loading one, else the preset + overrides."""
    if source is None:
        return cfg.model.build()
    saved = ckpt.read_manifest(source)["model_config"]
    clash = {k: (v, saved[k]) for k, v in cfg.model.overrides().items() if saved.get(k) != v}
    if clash:
        detail = ", ".join(f"model.{k}={v} but the checkpoint has {s}" for k, (v, s) in clash.items())
        raise ValueError(f"{detail}; drop the model.* override (the shape comes from the checkpoint)")
    return ModelConfig.from_dict(saved)


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
        from engine.pipeline import build_stage_chunks

        chunks = build_stage_chunks(mcfg, mesh, layers_per_stage=p.layers_per_stage,
                                    virtual_stages=p.virtual_stages, kernels=cfg.kernels)
    if mesh.tp > 1:
        from engine.tensor_parallel import parallelize

        for c in chunks:
            parallelize(c, mesh, sequence_parallel=p.sequence_parallel)
    for c in chunks:
        init_weights(c, seed=cfg.train.seed, n_layers=mcfg.n_layers, device=mesh.device)
        apply_recompute(c, p.recompute)
    return chunks


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Activation recomputation without renaming parameters: ``full`` recomputes whole blocks in
    backward, ``selective`` only their attention (the part with the largest activations per FLOP)."""
    if mode == "none":
        return
    from torch.utils.checkpoint import checkpoint

    for block in model.layers.values():
        target = block if mode == "full" else block.attention
        # Sequence parallelism saves the shard of a gathered input and re-gathers it in backward
        # (engine.tensor_parallel.SeqShard). Not where that saves nothing: full recompute gathers
        # the sequence again anyway, and the checkpoint of the attention keeps its (gathered)
        # input for the recomputation.
        block.attention.sp_regather = False
        if mode == "full":
            block.feed_forward.sp_regather = False
        inner = target.forward
        target.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)


def build_executor(cfg: Config, mcfg: ModelConfig, mesh: Mesh, chunks, n_micro: int):
    if mesh.pp == 1:
        return SerialExecutor(chunks[0], n_micro)
    from engine.pipeline import PipelineRunner

    t_local = cfg.train.seq_len // mesh.tp if cfg.parallel.sequence_parallel else cfg.train.seq_len
    return PipelineRunner(chunks, mesh, schedule=cfg.parallel.schedule, n_microbatches=n_micro,
                          virtual_stages=cfg.parallel.virtual_stages,
                          hidden_shape=(cfg.parallel.micro_batch_size, t_local, mcfg.dim))


def sync_grads(chunks, mesh: Mesh, dp_reducer: OverlappedGradReducer) -> None:
    """After all micro-batches: dp averaging first (its all-reduces are mostly in flight already;
    every sync here is a linear map, so the order does not change the result), then tp and pp."""
    dp_reducer.finish()
    if mesh.tp > 1:
        from engine.tensor_parallel import sync_tp_grads

        sync_tp_grads(chunks, mesh)
    if mesh.pp > 1:
        from engine.pipeline import sync_tied_grads

        sync_tied_grads(chunks, mesh)


# the phases in which the executor runs its schedule, by `backward`; a rank that times out in one of
# them reports the schedule action it was on
_SCHEDULE_PHASES = {True: "forward/backward", False: "evaluation forward"}


class Trainer:
    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        p = cfg.parallel
        init_distributed(timeout_s=p.timeout_s)
        self.mesh = mesh = build_mesh(tp=p.tp, pp=p.pp, dp=p.dp)
        g, mb = cfg.train.global_batch_size, p.micro_batch_size
        if g % (mb * mesh.dp):
            raise ValueError(
                f"train.global_batch_size={g} is not divisible by parallel.micro_batch_size={mb} × dp={mesh.dp}; "
                f"change train.global_batch_size or parallel.micro_batch_size")
        self.n_micro = g // (mb * mesh.dp)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_from = ckpt.resolve(self.ckpt_root, cfg.checkpoint.resume)
        self.load_from = ckpt.resolve(self.ckpt_root, cfg.checkpoint.load) if cfg.checkpoint.load else None
        self.mcfg = resolve_model_config(cfg, self.resume_from or self.load_from)
        if cfg.train.seq_len > self.mcfg.max_seq_len:
            raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={self.mcfg.max_seq_len}")
        if mesh.tp > 1:  # before any data or model work: a shape tp cannot split is a launch error
            from engine.tensor_parallel import validate_tp

            validate_tp(self.mcfg, mesh.tp, seq_len=cfg.train.seq_len, sequence_parallel=p.sequence_parallel)
        if mesh.pp > 1:
            from engine.pipeline import check_pipeline

            check_pipeline(n_layers=self.mcfg.n_layers, pp=mesh.pp, n_micro=self.n_micro, schedule=p.schedule,
                           virtual_stages=p.virtual_stages, layers_per_stage=p.layers_per_stage)
        self.data = ensure_data(cfg, mesh, self.mcfg.vocab_size)
        self.chunks = build_chunks(cfg, self.mcfg, mesh)
        self.executor = build_executor(cfg, self.mcfg, mesh, self.chunks, self.n_micro)
        self.refs = param_refs(self.chunks)
        self.dp_reducer = OverlappedGradReducer([r.param for r in self.refs], mesh.dp_group, self.n_micro)
        o = cfg.optim
        self.optimizer = Optimizer(self.refs, mesh, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                   weight_decay=o.weight_decay, zero=o.zero)
        self.step = 0
        self.phase = "setup"
        self.log = MetricsLog(self.run_dir / "metrics.jsonl" if mesh.rank == 0 else None)
        self.peak_flops, self.peak_label = device_peak_flops(mesh.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.precision == "bf16"
                         and mesh.device.type == "cuda" else contextlib.nullcontext())
        if self.resume_from is not None:
            self._restore(self.resume_from, with_optimizer=True)
        elif self.load_from is not None:
            self._restore(self.load_from, with_optimizer=False)

    def where(self) -> str:
        """What this rank is doing now, for the report of a timed-out or failed rank: the pipeline
        action it waits on when inside the schedule, else the phase of the step."""
        action = getattr(self.executor, "current_action", None)
        if self.phase in _SCHEDULE_PHASES.values() and action is not None:
            return f"pipeline action {action} of the {self.cfg.parallel.schedule} schedule"
        return self.phase

    # -- checkpoints ---------------------------------------------------------------------------
    def _model_entries(self):
        return [ckpt.Entry(f"model/{r.name}", r.param, r.meta) for r in self.refs]

    def save(self) -> Path:
        p = self.cfg.parallel
        layout = {"tp": self.mesh.tp, "pp": self.mesh.pp, "dp": self.mesh.dp, "virtual_stages": p.virtual_stages,
                  "layers_per_stage": p.layers_per_stage, "zero": self.cfg.optim.zero}
        state = {"step": self.step, "data_seed": self.cfg.train.seed, "data_dir": str(self.data.first.dir.resolve()),
                 "data_sources": [str(s.dir.resolve()) for s in self.data.sources], "data_weights": self.data.weights}
        self.phase = "checkpoint save"
        with torch.no_grad():
            return ckpt.save(self.ckpt_root, self.step, self._model_entries() + self.optimizer.state_entries(),
                             model_config=self.mcfg.to_dict(), layout=layout, train_state=state,
                             keep_last=self.cfg.checkpoint.keep_last)

    def _restore(self, path: Path, *, with_optimizer: bool) -> None:
        manifest = ckpt.read_manifest(path)
        entries = self._model_entries()
        if with_optimizer:
            self.step = int(manifest["train_state"]["step"])
            has_optim = any(k.startswith("optim/") for k in manifest["tensors"])
            if has_optim:
                entries += self.optimizer.init_state_entries(self.step)
        ckpt.load(path, entries, manifest=manifest)
        if self.mesh.rank == 0:
            what = f"resumed at step {self.step}" if with_optimizer else "loaded weights"
            print(f"{what} from {path}", flush=True)

    # -- steps ---------------------------------------------------------------------------------
    def _local_rows(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // self.mesh.dp
        return x[self.mesh.dp_rank * n:(self.mesh.dp_rank + 1) * n].to(self.mesh.device)

    def _run(self, inputs, targets, *, backward: bool):
        self.phase = _SCHEDULE_PHASES[backward]
        m = self.mesh
        x = self._local_rows(inputs) if m.is_first_stage else None
        y = self._local_rows(targets) if m.is_last_stage else None
        if m.pp == 1:
            x, y = self._local_rows(inputs), self._local_rows(targets)
        with self.autocast:
            loss = self.executor.forward_backward(x, y, backward=backward)
        return loss

    def _global_mean(self, loss, stop: bool = False) -> tuple[float, bool]:
        """The loss lives on the last stage's dp × tp ranks: one all-reduce brings the mean to all,
        carrying the stop flag with it."""
        self.phase = "loss all-reduce"
        m = self.mesh
        buf = torch.zeros(2, dtype=torch.float64, device=m.device)
        if m.is_last_stage and loss is not None:
            buf[0] = float(loss) / (m.dp * m.tp)
        buf[1] = float(stop)
        dist.all_reduce(buf)
        return float(buf[0]), bool(buf[1] > 0)

    def train_step(self, stop_requested: bool = False) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        inputs, targets = self.data.train_batch(self.step, seed=cfg.train.seed, batch_size=cfg.train.global_batch_size,
                                                seq_len=cfg.train.seq_len)
        loss = self._run(inputs, targets, backward=True)
        self.phase = "gradient synchronization (dp all-reduce, tp and tied-embedding sums)"
        sync_grads(self.chunks, self.mesh, self.dp_reducer)
        self.phase = "gradient-norm all-reduce"
        grad_norm = clip_grad_norm(self.refs, cfg.optim.clip_grad)
        lr = lr_at(self.step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        self.phase = "optimizer step (ZeRO broadcast)"
        self.optimizer.step(lr)
        self.optimizer.zero_grad()
        loss_value, stop = self._global_mean(loss, stop_requested)
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
                "tokens_per_s": tokens_per_s, "step_time_s": dt, "mfu": mfu,
                **self.data.position(samples, cfg.train.seq_len), "tokens_seen": samples * cfg.train.seq_len,
                "_stop": stop}

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg, m = self.cfg, self.mesh
        g = cfg.train.global_batch_size
        losses = []
        for b in range(cfg.eval.batches):
            x, y = self.data.eval_windows(b * g, g, seq_len=cfg.train.seq_len)
            losses.append(self._global_mean(self._run(x, y, backward=False))[0])
        return sum(losses) / len(losses)

    def run(self) -> list[dict]:
        """Train to ``train.max_steps`` (or evaluate once with ``train.eval_only``); returns the records."""
        cfg, m = self.cfg, self.mesh
        records = []
        if m.rank == 0:
            print(f"{m}; model {self.mcfg.num_params() / 1e6:.2f}M params; {self.n_micro} micro-batches per step; "
                  f"{self.peak_label}", flush=True)
        if cfg.train.eval_only:
            ev = self.evaluate()
            if m.rank == 0:
                print(f"eval_loss {ev:.6f}", flush=True)
                self.log.write({"step": self.step, "eval_loss": ev})
            return [{"step": self.step, "eval_loss": ev}]
        with StopSignal() as stop:
            return self._train_loop(stop)

    def _train_loop(self, stop: StopSignal) -> list[dict]:
        cfg, m = self.cfg, self.mesh
        records = []
        bar = _progress(self.step, cfg.train.max_steps, enabled=m.rank == 0)
        while self.step < cfg.train.max_steps:
            rec = self.train_step(stop.requested)
            stopping = rec.pop("_stop") or self.step == cfg.train.stop_at
            records.append(rec)
            if m.rank == 0:
                self.log.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.max_steps:
                    bar.write(_fmt(rec))
            if cfg.eval.interval and self.step % cfg.eval.interval == 0:
                ev = self.evaluate()
                records.append({"step": self.step, "eval_loss": ev})
                if m.rank == 0:
                    self.log.write(records[-1])
                    bar.write(f"step {self.step} eval_loss {ev:.4f}")
            if stopping or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                path = self.save()
                if m.rank == 0:
                    bar.write(f"saved {path}")
            if stopping:
                if m.rank == 0:
                    bar.write(f"stop requested: saved at step {self.step}, exiting")
                break
        bar.close()
        return records


def _progress(start, total, enabled):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, unit="step", dynamic_ncols=True)


def _fmt(rec: dict) -> str:
    mfu = "n/a" if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%"
    return (f"step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} grad_norm {rec['grad_norm']:.3f} "
            f"tokens/s {rec['tokens_per_s']:.0f} step {1000 * rec['step_time_s']:.0f} ms mfu {mfu}")


def main(cfg: Config) -> list[dict]:
    trainer = Trainer(cfg)
    if trainer.mesh.rank == 0:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        (trainer.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    try:
        records = trainer.run()
    except BaseException as e:
        # A hang surfaces here as a collective/p2p timeout (parallel.timeout_s). Say where this rank was,
        # then fail: torchrun sees a non-zero exit and stops the other ranks.
        m = trainer.mesh
        print(f"\nrank {m.rank} (pp {m.pp_rank}, dp {m.dp_rank}, tp {m.tp_rank}) failed in step {trainer.step + 1} "
              f"while waiting on {trainer.where()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        raise
    dist.barrier()
    return records
