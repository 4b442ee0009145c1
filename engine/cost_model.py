"""The planner's cost model: what one micro-batch costs one rank, in seconds and bytes.

* `DeviceProfile` / `DEVICES` — peak FLOP/s, memory and bandwidths of h100, h200, a100 and cpu.
* `Setup` — the training layout being planned (model, tp/pp/dp, batch, sequence parallelism,
  recompute, ZeRO), validated with errors that name the key to change.
* `CostModel` — per *item* (the embedding, each transformer layer, the final norm + head + loss):
  forward, backward-for-input and backward-for-weight seconds per micro-batch, parameter count per
  rank and activation bytes per micro-batch. `profile_items` replaces the analytic times by times
  measured on this machine (``planner.profile=true``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from engine.recompute import apply_recompute
from engine.tensor_parallel.plan import validate_tp
from models.config import ModelConfig
from models.llama import RECOMPUTE_MODES, Llama

GB = 1e9


# -- devices ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    name: str
    peak_flops: float  # dense matmul FLOP/s at the compute dtype (bf16 on GPUs, fp32 on the CPU)
    mem_gb: float  # memory per device
    hbm_bw: float  # bytes/s, for the memory-bound elementwise work
    tp_bw: float  # bytes/s per direction on the tensor-parallel links (NVLink inside a node)
    pp_bw: float  # bytes/s between pipeline stages (the network between nodes)
    p2p_latency_s: float
    matmul_eff: float  # fraction of peak a well-shaped training matmul reaches
    reserve_gb: float  # CUDA context, allocator slack, workspaces: not available to the model
    act_bytes: int  # bytes per activation element (bf16 on GPUs, fp32 on the CPU)


DEVICES: dict[str, DeviceProfile] = {
    # Datasheet peaks (SXM parts); links: NVLink 4 (450 GB/s per direction), one 400 Gb/s NIC per GPU.
    "h100": DeviceProfile("h100", 989e12, 80, 3.35e12, 450e9, 50e9, 10e-6, 0.55, 4, 2),
    "h200": DeviceProfile("h200", 989e12, 141, 4.8e12, 450e9, 50e9, 10e-6, 0.55, 4, 2),
    "a100": DeviceProfile("a100", 312e12, 80, 2.0e12, 300e9, 25e9, 10e-6, 0.6, 4, 2),
    # A small CPU host running gloo: only meaningful relative to itself (use planner.profile=true).
    "cpu": DeviceProfile("cpu", 50e9, 24, 20e9, 5e9, 5e9, 50e-6, 0.5, 0, 4),
}


def get_device(name: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ValueError(f"unknown planner.device={name!r}; known devices: {', '.join(sorted(DEVICES))} "
                         f"(or set planner.profile=true to time the layers on this machine)")
    return DEVICES[name]


# -- the training setup being planned ----------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    mcfg: ModelConfig
    tp: int = 1
    pp: int = 1
    dp: int = 1
    seq_len: int = 128
    global_batch: int = 16
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    zero: int = 0

    def __post_init__(self):
        m = self.mcfg
        if self.pp < 1 or self.tp < 1 or self.dp < 1:
            raise ValueError(f"parallel.tp/pp/dp must be >= 1, got tp={self.tp} pp={self.pp} dp={self.dp}")
        if self.pp > m.n_layers:
            raise ValueError(f"parallel.pp={self.pp} is greater than model.n_layers={m.n_layers}: every stage needs "
                             f"at least one layer; lower parallel.pp")
        # the trainer's own rule for what tp can split (heads, KV heads, ffn, vocabulary, sequence)
        validate_tp(m, self.tp, seq_len=self.seq_len, sequence_parallel=self.sequence_parallel)
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"parallel.recompute={self.recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}")
        if self.global_batch % self.dp:
            raise ValueError(f"train.global_batch_size={self.global_batch} is not divisible by dp={self.dp}")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


# -- cost model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One indivisible piece of the model as one stage runs it for one micro-batch."""

    name: str
    fwd_s: float
    bwd_input_s: float  # backward for the input (the critical path; includes recomputation)
    bwd_weight_s: float  # backward for the weights (deferrable in zero-bubble schedules)
    params: int  # parameters held by one rank (tp shard)
    act_bytes: float  # activations kept per micro-batch until the backward

    @property
    def bwd_s(self) -> float:
        return self.bwd_input_s + self.bwd_weight_s


class CostModel:
    """Analytic costs of the embedding, one layer and the head for one micro-batch on one rank."""

    def __init__(self, setup: Setup, device: DeviceProfile, micro_batch: int):
        self.s, self.dev, self.mb = setup, device, micro_batch

    # bytes of params + grads (fp32) + AdamW moments (fp32, sharded over dp by ZeRO-1)
    def state_bytes_per_param(self) -> float:
        return 4 + 4 + 8 / (self.s.dp if self.s.zero else 1)

    def _mm(self, flops: float) -> float:
        return flops / (self.dev.peak_flops * self.dev.matmul_eff)

    def _allreduce(self, nbytes: float) -> float:
        tp = self.s.tp
        return 0.0 if tp == 1 else 2 * (tp - 1) / tp * nbytes / self.dev.tp_bw

    def layer(self) -> Item:
        m, s, tp = self.s.mcfg, self.s, self.s.tp
        tokens = self.mb * s.seq_len
        d, hd, f = m.dim, m.head_dim, m.ffn_dim
        kv = m.n_kv_heads * hd
        attn_proj = 2 * tokens * d * (2 * d + 2 * kv) / tp  # q, k, v, o matmuls, forward
        mlp = 2 * tokens * 3 * d * f / tp
        core = 2 * 2 * tokens * s.seq_len * d / tp / 2  # QK^T and AV, causal (half the square)
        a = self.dev.act_bytes
        sp = tp if s.sequence_parallel else 1
        # Kept for backward, per token (elements): norm inputs/outputs and residual (4d, sharded only
        # under SP); q, k, v, rotated q and k, attention output, gate, up and their product (tp-sharded).
        per_tok = 4 * d / sp + (3 * d + 3 * kv + 3 * f) / tp
        attn_part = 2 * d / sp + (3 * d + 3 * kv) / tp
        elementwise = tokens * per_tok * a * 2 / self.dev.hbm_bw  # read + write of each saved tensor
        comm = 2 * self._allreduce(tokens * d * a)  # two all-reduces (or all-gather + reduce-scatter)
        fwd = self._mm(attn_proj + mlp + core) + elementwise + comm
        bwd_in = self._mm(attn_proj + mlp + 2 * core) + 2 * elementwise + comm
        bwd_w = self._mm(attn_proj + mlp)
        if s.sequence_parallel and s.recompute != "full":
            # the saved sequence shards are all-gathered again for the weight gradients: once per
            # attention (not under selective recompute) and per MLP; an all-gather moves half the
            # volume of an all-reduce
            bwd_in += (1 if s.recompute == "selective" else 2) * self._allreduce(tokens * d * a) / 2
        act = tokens * per_tok * a
        if s.recompute == "full":
            bwd_in += fwd
            act = tokens * d / sp * a
        elif s.recompute == "selective":
            bwd_in += self._mm(attn_proj / 2 + core) + elementwise * attn_part / per_tok + comm / 2
            act = tokens * (per_tok - attn_part + d / sp) * a
        params = (d * (2 * d + 2 * kv) + 3 * d * f) // tp + 2 * d
        return Item("layer", fwd, bwd_in, bwd_w, params, act)

    def embedding(self) -> Item:
        m, s = self.s.mcfg, self.s
        tokens = self.mb * s.seq_len
        a = self.dev.act_bytes
        move = tokens * m.dim * a / self.dev.hbm_bw  # gather rows / scatter-add their gradients
        comm = self._allreduce(tokens * m.dim * a)  # vocab-parallel embedding: partial rows summed
        return Item("embedding", move + comm, 0.0, move, m.vocab_size * m.dim // s.tp, 0.0)

    def head(self) -> Item:
        """Final norm, output projection and (vocab-parallel) cross-entropy; the logits are fp32."""
        m, s = self.s.mcfg, self.s
        tokens = self.mb * s.seq_len
        v = m.vocab_size / s.tp
        proj = 2 * tokens * m.dim * v
        logits_bytes = tokens * v * 4
        softmax = 3 * logits_bytes / self.dev.hbm_bw
        fwd = self._mm(proj) + softmax
        act = logits_bytes + tokens * m.dim * self.dev.act_bytes
        # tied embeddings: a last stage that is not the first holds its own copy of the table
        params = m.vocab_size * m.dim // s.tp + m.dim
        return Item("head", fwd, self._mm(proj) + softmax, self._mm(proj), params, act)

    def items(self) -> list[Item]:
        """[embedding, layer 0, ..., layer L-1, head]."""
        return [self.embedding()] + [self.layer()] * self.s.mcfg.n_layers + [self.head()]

    def p2p_bytes(self) -> float:
        sp = self.s.tp if self.s.sequence_parallel else 1
        return self.mb * self.s.seq_len * self.s.mcfg.dim * self.dev.act_bytes / sp

    def p2p_time(self) -> float:
        return self.dev.p2p_latency_s + self.p2p_bytes() / self.dev.pp_bw

    def dp_sync_time(self, params: int) -> float:
        """Averaging fp32 gradients over dp once per step (a ring all-reduce, or ZeRO-1's
        reduce-scatter + all-gather: the same volume) on the network, counted as not overlapped."""
        dp = self.s.dp
        return 0.0 if dp == 1 else 2 * (dp - 1) / dp * params * 4 / self.dev.pp_bw

    def optimizer_time(self, params: int) -> float:
        """AdamW over this rank's parameters: memory bound (read/write param, grad, two moments)."""
        return params * self.state_bytes_per_param() * 2 / self.dev.hbm_bw


def saved_tensor_bytes(params, run) -> int:
    """Bytes autograd saves for backward while ``run()`` executes: distinct storages, the given
    parameters excluded. Returns after ``run``; the caller frees the graph (backward or drop it)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def profile_items(setup: Setup, micro_batch: int, *, reps: int = 5, kernels: str = "torch",
                  threads: int | None = 1) -> list[Item]:
    """Times the real embedding, one real layer and the real head + loss on this machine at the
    micro-batch shape, forward and backward (fastest of ``reps``, with ``parallel.recompute`` applied
    as in training), and measures the bytes autograd saves for backward (without recompute; the
    analytic estimate otherwise). Parameter sizes are analytic. Backward is split evenly between
    the input and weight halves.
    ``threads``: intra-op threads per rank in the run being planned (torchrun on a CPU: 1)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # One thread runs every op on this thread, so its CPU time is the op's time without the periods
    # the OS gave the core to other processes: robust on a shared machine. Otherwise wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    try:
        return _profile_items(setup, micro_batch, reps, kernels, clock)
    finally:
        torch.set_num_threads(previous)


def _profile_items(setup: Setup, micro_batch: int, reps: int, kernels: str, clock) -> list[Item]:
    if setup.tp != 1:
        raise ValueError("planner.profile=true times whole (unsharded) layers on this machine; use it with "
                         "parallel.tp=1, or drop planner.profile to use the analytic model")
    m, T = setup.mcfg, setup.seq_len
    torch.manual_seed(0)
    model = Llama(replace(m, n_layers=1), kernels=kernels)
    apply_recompute(model, setup.recompute)  # time exactly what training runs
    layer = model.layers["0"]
    tokens = torch.randint(0, m.vocab_size, (micro_batch, T))
    hidden = torch.randn(micro_batch, T, m.dim)

    def timed(fn):
        times = []
        for _ in range(reps + 1):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return min(times[1:])  # the fastest: the least disturbed by other work on the machine

    def fwd_bwd(run):
        """(forward s, backward s) of ``run()``, which returns the tensor to backpropagate from."""
        f = timed(lambda: run().detach())
        state = {}

        def bwd():
            out = state.pop("out")
            out.backward(torch.ones_like(out))

        times = []
        for _ in range(reps + 1):
            state["out"] = run()
            t0 = clock()
            bwd()
            times.append(clock() - t0)
        model.zero_grad(set_to_none=True)
        return f, min(times[1:])

    h_in = hidden.requires_grad_(True)
    parts = {"emb": lambda: model.tok_embeddings(tokens), "layer": lambda: layer(h_in),
             "head": lambda: model.loss_fn(model.logits(h_in), tokens)}
    times = {k: fwd_bwd(run) for k, run in parts.items()}
    analytic = CostModel(setup, DEVICES["cpu"], micro_batch).items()
    out = []
    for key, item in (("emb", analytic[0]), ("layer", analytic[1]), ("head", analytic[-1])):
        f, b = times[key]
        # Measured activations when nothing is recomputed (checkpointed tensors bypass the hook).
        act = saved_tensor_bytes(model.parameters(), parts[key]) if setup.recompute == "none" else item.act_bytes
        split = (0.0, b) if key == "emb" else (b / 2, b / 2)
        out.append(replace(item, fwd_s=f, bwd_input_s=split[0], bwd_weight_s=split[1], act_bytes=act))
    return [out[0]] + [out[1]] * m.n_layers + [out[2]]
