"""Executes one pp rank's action list on its model chunks.

* p2p: consecutive SF/RF/SB/RB actions go out as one `batch_isend_irecv`. A receive is waited on
  only by the compute that consumes it, sends only at the end of the step (finished ones are
  dropped as batches go by), so a rank idles only when the data it needs next has not arrived. (The
  validator proves the lists deadlock-free even when every batch waits for all its operations at
  once; waiting later can only remove waits.) Every message goes with tag 0: NCCL ignores tags
  and matches a rank pair's messages in posting order, and gloo matches same-tag messages of a
  pair in posting order too, so CPU runs exercise the very matching GPUs do. That is correct
  because the validator proves, for every ordered rank pair, that the receives are posted in the
  order of the sends (`validate.check_p2p_order`). Peers are the pp ranks with
  this rank's dp and tp coordinates, so the runtime composes with tensor and data parallelism.
* Memory: a stage's input and output for a micro-batch are kept from its F until its backward
  (B, or I for the graph) and dropped then; `live_peak` records the most that were alive at once.
* Loss: each micro-batch's loss is scaled by 1/n_micro before backward, so the accumulated gradients
  equal the serial step's over the whole batch.
* Wire dtype: activations and their gradients travel in ``dtype`` (``parallel.p2p_dtype``): float32
  by default, bfloat16 to halve the bytes under ``precision=bf16``. Under autocast the residual
  stream a stage hands on is float32 (only the matmuls run in bf16), so a bf16 wire rounds it once
  per stage boundary; the receiver casts back to the stage's own dtype before computing.
* Zero-bubble (I/W): a list with W actions turns on the chunks' weight-gradient deferral
  (`engine.pipeline.weight_grad`): an I runs backward inside `WeightGradStore.capture`, which
  stashes what each deferred weight gradient needs, and the W action computes them.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from engine.layout import stage_rank
from engine.mesh import Mesh
from engine.pipeline.actions import Action, Kind
from engine.pipeline.lowering import p2p_batches
from engine.pipeline.validate import StepActions
from engine.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral


def post_p2p(ops: list) -> list:
    """Post one batch with `batch_isend_irecv` and return one work per op.

    gloo returns a work per op, NCCL one coalesced work for the whole batch (the group kernel
    finishes all its sends and receives together). A coalesced work stands for every op here, so
    waiting for a receive waits for its whole batch: the validator proves that safe, since it
    already completes a batch only once all of its operations are matched."""
    works = dist.batch_isend_irecv(ops)
    if len(works) == len(ops):
        return works
    if len(works) == 1:
        return works * len(ops)
    raise RuntimeError(f"batch_isend_irecv returned {len(works)} works for {len(ops)} ops; expected one per op "
                       f"(gloo) or one for the batch (NCCL)")


class PipelineRunner:
    """Runs a step's micro-batches through this rank's chunks following proven action lists
    (`engine.pipeline.validate.build_step_actions`, built once per launch by the trainer)."""

    def __init__(self, chunks: Sequence[nn.Module], mesh: Mesh, actions: StepActions, *,
                 hidden_shape: tuple[int, int, int], dtype: torch.dtype = torch.float32):
        if actions.pp != mesh.pp:
            raise ValueError(f"action lists built for pp={actions.pp} given to a mesh with pp={mesh.pp}")
        if len(chunks) != actions.virtual_stages:
            raise ValueError(f"got {len(chunks)} model chunks for virtual_stages={actions.virtual_stages}; "
                             f"build them with build_stage_chunks(..., virtual_stages={actions.virtual_stages})")
        self.chunks = list(chunks)
        self.mesh = mesh
        self.pp, self.v, self.n_micro = mesh.pp, actions.virtual_stages, actions.n_micro
        self.n_stages = self.pp * self.v
        self.hidden_shape = tuple(hidden_shape)
        self.dtype = dtype   # on the wire
        # what the stages compute in and hand on: their parameters' dtype (float32 under autocast)
        self.act_dtype = next((p.dtype for c in self.chunks for p in c.parameters() if p.is_floating_point()),
                              torch.float32)
        self.schedule = actions.schedule
        self.placement = actions.placement
        self.my_stages = actions.stages(mesh.pp_rank)
        self.holds_first, self.holds_last = 0 in self.my_stages, self.n_stages - 1 in self.my_stages
        self.actions = actions.train[mesh.pp_rank]
        self.forward_actions = actions.forward[mesh.pp_rank]
        self.store = WeightGradStore()
        if any(a.kind == Kind.W for a in self.actions):
            enable_weight_grad_deferral(self.chunks, self.store)
        # last step: (action(s), start, end) in seconds from the step's start; a compute action's
        # start excludes the time it waited for its received input
        self.timings: list[tuple[str, float, float]] = []
        self.live_peak = 0
        self.current_action: str | None = None
        # on CUDA: (label, completion event) per action of the running step, so a hang report can
        # name the action the GPU is stuck on while the host has already run ahead (engine/hang.py)
        self._events: list[tuple[str, object]] = []
        self._track_gpu = mesh.device.type == "cuda"
        # parallel.trace_steps: set by the trainer for the traced steps; `trace_rows` then holds the
        # step's slices (engine/pipeline/trace.py)
        self.tracing = False
        self.trace_rows: list[tuple[str, str, float, float]] = []

    # ------------------------------------------------------------------------------------- helpers
    def _chunk(self, stage: int) -> nn.Module:
        return self.chunks[self.my_stages.index(stage)]

    def _peer(self, a: Action) -> int:
        return self.mesh.pp_global_rank(stage_rank(a.peer_stage, self.pp, self.placement))

    def _here(self, stage: int) -> bool:
        """Whether ``stage`` lives on this rank (then its tensors hand over in memory)."""
        return stage in self.my_stages

    def _count_live(self) -> None:
        """Activations really alive: a stage output some reference still holds, or inputs and
        output-gradients an I left for its W."""
        live = {k for k, r in self._refs.items() if r() is not None} | set(self.store.pending)
        self._refs = {k: r for k, r in self._refs.items() if r() is not None}
        self.live_peak = max(self.live_peak, len(live))

    # ------------------------------------------------------------------------------------- step
    def forward_backward(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *, backward: bool = True):
        """One step. ``inputs`` (n_micro·mb, T) tokens on the first stage, ``targets`` on the last, None
        elsewhere. Returns the mean loss over the micro-batches on the last stage, else None."""
        mesh, mb = self.mesh, self.hidden_shape[0]
        if self.holds_first:
            self._x = self._split(inputs, "inputs")
        if self.holds_last:
            self._y = self._split(targets, "targets")
        self._acts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}   # (mb, stage) -> (in, out)
        self._recv: dict[Action, tuple] = {}   # receive -> (work, buffer)
        self._grads: dict[tuple[int, int], torch.Tensor] = {}   # (mb, stage) -> gradient of the stage's input
        self._sends: list = []
        self._refs: dict[tuple[int, int], weakref.ref] = {}
        self._loss = torch.zeros((), device=mesh.device)
        self.timings = []
        self._events = []
        self.trace_rows = []
        t0 = self._t0 = time.perf_counter()
        self.step_wall_start = time.time()   # where a traced step sits on the trace's (wall-clock) axis
        if self.tracing and self._track_gpu:
            self._step_start = torch.cuda.Event(enable_timing=True)
            self._step_start.record()
        actions = self.actions if backward else self.forward_actions
        with contextlib.nullcontext() if backward else torch.no_grad():
            for item in p2p_batches(actions):
                start = time.perf_counter()
                # what a rank that times out reports it was waiting on (see engine.trainer.main)
                self.current_action = str(item) if isinstance(item, Action) else " ".join(str(a) for a in item)
                self._waited = 0.0
                if isinstance(item, Action):
                    getattr(self, f"_run_{item.kind}")(item)
                    self._count_live()
                    label = str(item)
                    start += self._waited       # a compute action's span starts when its data arrived
                else:
                    self._communicate(item)
                    label = " ".join(str(a) for a in item)
                end = time.perf_counter()
                self.timings.append((label, start - t0, end - t0))
                if self.tracing:
                    self.trace_rows.append((label, "compute" if isinstance(item, Action) else "p2p",
                                            start - t0, end - t0))
                if self._track_gpu:
                    event = torch.cuda.Event(enable_timing=self.tracing)
                    event.record()
                    self._events.append((label, event))
        self._wait_sends()
        if self.tracing and self._track_gpu:
            self._gpu_trace_rows()
        leftovers = [k for k in self._acts] + list(self.store.pending)
        self._acts = {}
        if backward and leftovers:
            raise RuntimeError(f"pipeline step ended with activations still held for {leftovers}")
        return self._loss / self.n_micro if self.holds_last else None

    def _gpu_trace_rows(self) -> None:
        """On CUDA the host runs ahead of the GPU, so a traced step's slices are read from the
        completion events instead: each action spans from the previous action's completion to its
        own (one stream runs them in order), waits included. One synchronize, on traced steps only."""
        self._events[-1][1].synchronize()
        rows, prev = [], 0.0
        for (label, event), (_, cat, _, _) in zip(self._events, self.trace_rows):
            end = self._step_start.elapsed_time(event) / 1e3
            rows.append((label, cat, prev, end))
            prev = end
        self.trace_rows = rows

    def stuck_action(self) -> str | None:
        """On CUDA, the first action of the running step the GPU has not finished (None when all
        have, or off CUDA, where a blocked rank is inside `current_action` itself)."""
        return next((label for label, event in list(self._events) if not event.query()), None)

    def _split(self, t: torch.Tensor | None, what: str) -> list[torch.Tensor]:
        mb = self.hidden_shape[0]
        if t is None or t.shape[0] != self.n_micro * mb:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"pipeline stage expects {what} of {self.n_micro} micro-batches × {mb} rows, got {got}")
        return list(t.split(mb))

    # ------------------------------------------------------------------------------------- p2p
    def _communicate(self, batch: list[Action]) -> None:
        # tag 0 for every message: ends are paired by posting order per rank pair, as under NCCL
        # (build_step_actions proved the orders equal, for the training and the forward-only lists)
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]   # drop finished sends
        ops, recvs = [], []
        for a in batch:
            if a.kind == Kind.SF:
                key = (a.mb, a.stage)
                tensor = (self._acts[key] if torch.is_grad_enabled() else self._acts.pop(key))[1].detach()
                ops.append(dist.P2POp(dist.isend, tensor.to(self.dtype), self._peer(a), tag=0))
            elif a.kind == Kind.SB:
                tensor = self._grads.pop((a.mb, a.stage)).to(self.dtype)
                ops.append(dist.P2POp(dist.isend, tensor, self._peer(a), tag=0))
            else:
                buf = torch.empty(self.hidden_shape, dtype=self.dtype, device=self.mesh.device)
                ops.append(dist.P2POp(dist.irecv, buf, self._peer(a), tag=0))
                recvs.append(a)
        pending = iter(recvs)
        for w, op in zip(post_p2p(ops), ops):
            if op.op is dist.isend:
                self._sends.append((w, op.tensor))    # keeps the tensor alive until sent
            else:
                self._recv[next(pending)] = (w, op.tensor)   # waited on only by the compute that needs it

    def _take(self, recv: Action) -> torch.Tensor:
        work, buf = self._recv.pop(recv)
        t = time.perf_counter()
        consumer, self.current_action = self.current_action, f"{recv} (for {self.current_action})"
        work.wait()
        self.current_action = consumer
        done = time.perf_counter()
        self._waited += done - t
        if self.tracing and not self._track_gpu:
            self.trace_rows.append((f"wait {recv}", "wait", t - self._t0, done - self._t0))
        return buf

    def _wait_sends(self) -> None:
        self.current_action = "completion of this step's sends"
        for w, _ in self._sends:
            w.wait()
        self._sends = []

    # ------------------------------------------------------------------------------------- compute
    def _stage_input(self, a: Action) -> torch.Tensor:
        if a.stage == 0:
            return self._x[a.mb]
        if self._here(a.stage - 1):        # previous stage on this rank (the turn of a V)
            key = (a.mb, a.stage - 1)
            h = (self._acts[key] if torch.is_grad_enabled() else self._acts.pop(key))[1].detach()
        else:
            h = self._take(Action(a.stage, Kind.RF, a.mb)).to(self.act_dtype)
        return h.requires_grad_(torch.is_grad_enabled())

    def _run_F(self, a: Action) -> None:
        x = self._stage_input(a)
        chunk = self._chunk(a.stage)
        if a.stage == self.n_stages - 1:
            loss = chunk(x, self._y[a.mb])
            self._loss = self._loss + loss.detach()
            out = loss / self.n_micro
            if not torch.is_grad_enabled():
                return
        else:
            out = chunk(x)
        self._acts[(a.mb, a.stage)] = (x, out)
        if torch.is_grad_enabled():
            self._refs[(a.mb, a.stage)] = weakref.ref(out)

    def _backward(self, a: Action) -> None:
        x, out = self._acts.pop((a.mb, a.stage))
        if a.stage == self.n_stages - 1:
            torch.autograd.backward(out)
        else:
            if self._here(a.stage + 1):     # next stage on this rank (the turn of a V)
                grad = self._grads.pop((a.mb, a.stage + 1))
            else:
                grad = self._take(Action(a.stage, Kind.RB, a.mb)).to(out.dtype)
            torch.autograd.backward(out, grad)
        if a.stage > 0:
            self._grads[(a.mb, a.stage)] = x.grad
        del x, out

    def _run_B(self, a: Action) -> None:
        self._backward(a)

    def _run_I(self, a: Action) -> None:
        with self.store.capture((a.mb, a.stage)):
            self._backward(a)

    def _run_W(self, a: Action) -> None:
        self.store.flush((a.mb, a.stage))
