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

from engine.data_parallel import BUCKET_BYTES
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
    hbm_bw: float  # bytes/s, for the memory-bound elementwise work and the GEMMs' operand traffic
    tp_bw: float  # bytes/s per direction on the links inside a node (NVLink): tp, p2p gathers, dp inside a node
    pp_bw: float  # bytes/s per direction of one GPU's network interface (NIC) to other nodes
    p2p_latency_s: float
    matmul_eff: float  # ceiling: the fraction of peak the largest GEMMs reach (see `gemm_time`)
    reserve_gb: float  # CUDA context, allocator slack, workspaces: not available to the model
    act_bytes: int  # bytes per activation element at the device's compute dtype (bf16 on GPUs, fp32 on the CPU)

    @property
    def ridge(self) -> float:
        """FLOPs per byte where the datasheet peak and the HBM bandwidth meet."""
        return self.peak_flops / self.hbm_bw

    def gemm_time(self, m: float, k: float, n: float, elem_bytes: float = 2) -> float:
        """Seconds for an (m × k) @ (k × n) matmul: its FLOPs at the ceiling ``matmul_eff`` of peak plus
        one pass over its three operands at HBM bandwidth. The efficiency this implies,
        eff = matmul_eff · I / (I + matmul_eff · ridge) with I = 2mkn / (bytes of the operands),
        rises with the GEMM's arithmetic intensity (docs/planner.md, "GEMM efficiency")."""
        return 2 * m * k * n / (self.peak_flops * self.matmul_eff) + elem_bytes * (m * k + k * n + m * n) / self.hbm_bw

    def gemm_efficiency(self, m: float, k: float, n: float, elem_bytes: float = 2) -> float:
        return 2 * m * k * n / self.peak_flops / self.gemm_time(m, k, n, elem_bytes)


# The GEMM ceiling on NVIDIA parts: one constant, fitted once (least squares on the log ratios of the ten
# rows, a single number for all of them) to the Megatron-LM SC21 Table 1 runs on A100
# (scripts/validate_planner.py; docs/planner.md, "GEMM efficiency"), and assumed for Hopper too.
GPU_MATMUL_EFF = 0.694

DEVICES: dict[str, DeviceProfile] = {
    # Datasheet peaks. H100/H200 SXM: 989 TFLOP/s dense bf16, 3.35 / 4.8 TB/s HBM, NVLink 4 (900 GB/s
    # total, 450 per direction), one 400 Gb/s NIC per GPU.
    "h100": DeviceProfile("h100", 989e12, 80, 3.35e12, 450e9, 50e9, 10e-6, GPU_MATMUL_EFF, 4, 2),
    "h200": DeviceProfile("h200", 989e12, 141, 4.8e12, 450e9, 50e9, 10e-6, GPU_MATMUL_EFF, 4, 2),
    # H100 PCIe (HBM2e): 756 TFLOP/s dense bf16 (1,513 with sparsity), 80 GB at 2.0 TB/s (NVIDIA H100
    # datasheet). NVLink bridges join only pairs (600 GB/s total); a tp group beyond 2 talks over PCIe
    # Gen5 x16 (64 GB/s per direction), which this profile assumes for every in-node link.
    "h100_pcie": DeviceProfile("h100_pcie", 756e12, 80, 2.0e12, 64e9, 50e9, 10e-6, GPU_MATMUL_EFF, 4, 2),
    # A100 SXM 80 GB: 312 TFLOP/s dense bf16/fp16, 2.04 TB/s, NVLink 3 (600 GB/s total), one 200 Gb/s
    # HDR InfiniBand NIC per GPU (DGX A100, the SC21 machine).
    "a100": DeviceProfile("a100", 312e12, 80, 2.04e12, 300e9, 25e9, 10e-6, GPU_MATMUL_EFF, 4, 2),
    # A small CPU host running gloo: only meaningful relative to itself (use planner.profile=true).
    "cpu": DeviceProfile("cpu", 50e9, 24, 20e9, 5e9, 5e9, 50e-6, 0.5, 0, 4),
}


def get_device(name: str) -> DeviceProfile:
    if name not in DEVICES:
        raise ValueError(f"unknown planner.device={name!r}; known devices: {', '.join(sorted(DEVICES))} "
                         f"(or set planner.profile=true to time the layers on this machine)")
    return DEVICES[name]


# -- the training setup being planned ----------------------------------------------------------------
ATTENTION_KINDS = ("flash", "unfused")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


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
    zero: int = 0  # optim.zero: 0, 1 or 2
    precision: str | None = None  # fp32 | bf16; None: the device's compute dtype (bf16 on GPUs, fp32 on the CPU)
    p2p_dtype: str | None = None  # dtype of the pipeline messages; None: the compute dtype
    gpus_per_node: int = 8  # GPUs sharing one NVLink domain: a dp group within one node reduces over NVLink
    # flash: the engine's fused causal attention (SDPA: half the score FLOPs, no T×T tensor in memory);
    # unfused: T×T scores materialized in HBM, full QKᵀ and AV FLOPs, softmax and dropout on the scores
    # (Megatron-LM as run for SC21; scripts/validate_planner.py)
    attention: str = "flash"

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
        if self.zero not in (0, 1, 2):
            raise ValueError(f"optim.zero={self.zero!r} is not one of 0, 1, 2")
        for key, v in (("precision", self.precision), ("parallel.p2p_dtype", self.p2p_dtype)):
            if v is not None and v not in DTYPE_BYTES:
                raise ValueError(f"{key}={v!r} is not one of fp32, bf16")
        if self.gpus_per_node < 1:
            raise ValueError(f"planner.gpus_per_node={self.gpus_per_node} must be at least 1")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not one of {', '.join(ATTENTION_KINDS)}")

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
    work_bytes: float = 0.0  # transient bytes while its backward runs (recomputed activations, logit gradients)

    @property
    def bwd_s(self) -> float:
        return self.bwd_input_s + self.bwd_weight_s


class CostModel:
    """Analytic costs of the embedding, one layer and the head for one micro-batch on one rank."""

    def __init__(self, setup: Setup, device: DeviceProfile, micro_batch: int):
        self.s, self.dev, self.mb = setup, device, micro_batch
        self.precision = setup.precision or ("bf16" if device.act_bytes == 2 else "fp32")
        self.a = DTYPE_BYTES[self.precision]  # activation bytes per element

    # -- memory of the optimizer modes (engine/memory.py's rules, per parameter of this rank) ------------
    def bf16_params(self) -> bool:
        """ZeRO-2 with precision=bf16 and dp > 1 keeps bf16 parameters and gradients (engine/trainer.py);
        every other mode keeps fp32 parameters (autocast computes in bf16)."""
        return self.s.zero == 2 and self.precision == "bf16" and self.s.dp > 1

    def grad_bytes(self) -> int:
        """Bytes per gradient element as the dp reduction sends it."""
        return 2 if self.bf16_params() else 4

    def state_bytes_per_param(self) -> float:
        """Parameters + gradients + fp32 master weights + AdamW moments, per parameter of this rank:
        zero=0: 4 + 4 + 8; zero=1: 4 + 4 + 8/dp; zero=2 (fp32): 4 + 4 + 8/dp; zero=2 with bf16
        parameters: 2 + 2 + (4 fp32 gradient slice + 4 master + 8 moments)/dp. dp = 1 runs as zero=0."""
        dp = self.s.dp
        if dp == 1 or self.s.zero == 0:
            return 16.0
        if self.bf16_params():
            return 2 + 2 + 16 / dp
        return 4 + 4 + 8 / dp

    # -- time -----------------------------------------------------------------------------------------
    def _gemm(self, m, k, n, count=1) -> float:
        return count * self.dev.gemm_time(m, k, n, self.a)

    def _fwd_bwd_gemms(self, shapes) -> tuple[float, float, float]:
        """(forward, backward-for-input, backward-for-weight) seconds of (m, k, n) matmuls whose k × n
        operand is a weight: dX = dY Wᵀ is (m, n, k), dW = Xᵀ dY is (k, m, n)."""
        f = sum(self._gemm(m, k, n) for m, k, n in shapes)
        bi = sum(self._gemm(m, n, k) for m, k, n in shapes)
        bw = sum(self._gemm(k, m, n) for m, k, n in shapes)
        return f, bi, bw

    def _allreduce(self, nbytes: float) -> float:
        tp = self.s.tp
        return 0.0 if tp == 1 else 2 * (tp - 1) / tp * nbytes / self.dev.tp_bw

    def _attention(self) -> tuple[float, float, float, float]:
        """(forward s, backward s, kept bytes, transient bytes) of the attention core (softmax(QKᵀ)V)
        for one micro-batch on one rank."""
        m, s, tp = self.s.mcfg, self.s, self.s.tp
        T, hd = s.seq_len, m.head_dim
        batch = self.mb * m.n_heads // tp  # (micro-batch, local head) pairs
        qk, av = self._gemm(T, hd, T, batch), self._gemm(T, T, hd, batch)
        scores = batch * T * T
        if s.attention == "flash":
            # causal: half the score tiles are skipped; backward recomputes QKᵀ (5 matmuls to 2)
            fwd = (qk + av) / 2
            return fwd, 2.5 * fwd, 0.0, 0.0
        # scale + mask + softmax (read, write) and dropout (read, write, a byte of mask) on the scores,
        # 2-byte elements; backward: dropout (read grad and mask, write) and softmax (read grad and probs,
        # write). The matmuls' operand traffic is in `gemm_time`.
        elem = scores * 2 / self.dev.hbm_bw
        fwd = qk + av + elem * 4.5
        bwd = 2 * (qk + av) + elem * 5.5
        return fwd, bwd, scores * 3, scores * 4  # kept: probabilities and the dropout mask

    def layer(self) -> Item:
        m, s, tp = self.s.mcfg, self.s, self.s.tp
        tokens = self.mb * s.seq_len
        d, f = m.dim, m.ffn_dim
        kv = m.n_kv_heads * m.head_dim
        shapes = [(tokens, d, (d + 2 * kv) / tp), (tokens, d / tp, d), (tokens, d, 2 * f / tp), (tokens, f / tp, d)]
        g_f, g_bi, g_bw = self._fwd_bwd_gemms(shapes)
        at_f, at_b, at_act, at_work = self._attention()
        a = self.a
        sp = tp if s.sequence_parallel else 1
        # Kept for backward, per token (elements): norm inputs/outputs and residual (4d, sharded only
        # under SP); q, k, v, rotated q and k, attention output, gate, up and their product (tp-sharded).
        per_tok = 4 * d / sp + (3 * d + 3 * kv + 3 * f) / tp
        attn_part = 2 * d / sp + (3 * d + 3 * kv) / tp
        elementwise = tokens * per_tok * a * 2 / self.dev.hbm_bw  # read + write of each saved tensor
        comm = 2 * self._allreduce(tokens * d * a)  # two all-reduces (or all-gather + reduce-scatter)
        fwd = g_f + at_f + elementwise + comm
        bwd_in = g_bi + at_b + 2 * elementwise + comm
        bwd_w = g_bw
        if s.sequence_parallel and s.recompute != "full":
            # the saved sequence shards are all-gathered again for the weight gradients: once per
            # attention (not under selective recompute) and per MLP; an all-gather moves half the
            # volume of an all-reduce
            bwd_in += (1 if s.recompute == "selective" else 2) * self._allreduce(tokens * d * a) / 2
        full_act = tokens * per_tok * a + at_act
        act, work = full_act, at_work
        if s.recompute == "full":
            bwd_in += fwd
            act, work = tokens * d / sp * a, full_act + at_work
        elif s.recompute == "selective":
            q_kv = (d + 2 * kv) / tp
            bwd_in += self._gemm(tokens, d, q_kv) + at_f + elementwise * attn_part / per_tok + comm / 2
            act = tokens * (per_tok - attn_part + d / sp) * a
            work = tokens * attn_part * a + at_act + at_work
        params = (d * (2 * d + 2 * kv) + 3 * d * f) // tp + 2 * d
        return Item("layer", fwd, bwd_in, bwd_w, params, act, work)

    def embedding(self) -> Item:
        m, s = self.s.mcfg, self.s
        tokens = self.mb * s.seq_len
        move = tokens * m.dim * self.a / self.dev.hbm_bw  # gather rows / scatter-add their gradients
        comm = self._allreduce(tokens * m.dim * self.a)  # vocab-parallel embedding: partial rows summed
        return Item("embedding", move + comm, 0.0, move, m.vocab_size * m.dim // s.tp, 0.0)

    def head(self) -> Item:
        """Final norm, output projection and (vocab-parallel) cross-entropy; the logits are fp32."""
        m, s = self.s.mcfg, self.s
        tokens = self.mb * s.seq_len
        v = m.vocab_size / s.tp
        g_f, g_bi, g_bw = self._fwd_bwd_gemms([(tokens, m.dim, v)])
        logits_bytes = tokens * v * 4
        softmax = 3 * logits_bytes / self.dev.hbm_bw
        act = logits_bytes + tokens * m.dim * self.a
        # tied embeddings: a last stage that is not the first holds its own copy of the table
        params = m.vocab_size * m.dim // s.tp + m.dim
        return Item("head", g_f + softmax, g_bi + softmax, g_bw, params, act, logits_bytes)

    def items(self) -> list[Item]:
        """[embedding, layer 0, ..., layer L-1, head]."""
        return [self.embedding()] + [self.layer()] * self.s.mcfg.n_layers + [self.head()]

    # -- communication between stages and over dp --------------------------------------------------------
    def p2p_bytes(self) -> float:
        """One micro-batch's hidden state (or its gradient) as one tp rank sends it: without sequence
        parallelism the tp ranks each send 1/tp of it over their own NIC and all-gather it on arrival
        (Megatron's scatter-gather); with it each rank already holds its 1/tp sequence shard."""
        e = DTYPE_BYTES[self.s.p2p_dtype] if self.s.p2p_dtype else self.a
        return self.mb * self.s.seq_len * self.s.mcfg.dim * e / self.s.tp

    def p2p_time(self) -> float:
        tp = self.s.tp
        gather = 0.0 if self.s.sequence_parallel or tp == 1 else (tp - 1) * self.p2p_bytes() / self.dev.tp_bw
        return self.dev.p2p_latency_s + self.p2p_bytes() / self.dev.pp_bw + gather

    def dp_bandwidth(self) -> float:
        """Bytes/s a dp reduction moves per rank. Ranks are tp-innermost, then dp: a dp group of
        tp × dp ≤ gpus_per_node GPUs is inside one node (NVLink); otherwise each node's dp members
        drive one ring each over their own NICs (NCCL's channels), up to the NVLink rate."""
        s, dev = self.s, self.dev
        if s.tp * s.dp <= s.gpus_per_node:
            return dev.tp_bw
        per_node = max(1, s.gpus_per_node // s.tp)
        return min(dev.tp_bw, per_node * dev.pp_bw)

    def dp_sync_time(self, params: int) -> float:
        """Seconds of dp gradient traffic for ``params`` parameters, in the gradient dtype: a ring
        all-reduce (zero=0/1), or under zero=2 a reduce-scatter plus the all-gather of the updated
        parameters (the same volume)."""
        dp = self.s.dp
        return 0.0 if dp == 1 else 2 * (dp - 1) / dp * params * self.grad_bytes() / self.dp_bandwidth()

    def dp_exposed_time(self, params: int, backward_s: float) -> float:
        """The dp reduction's part the step waits for. Gradients are reduced in buckets
        (engine/data_parallel.py, 25 MiB) as the last micro-batch's backward produces them, so the
        traffic overlaps that backward (``backward_s``); the last bucket's reduction always trails it.
        ZeRO-2's parameter all-gather follows the optimizer step and is not overlapped."""
        if self.s.dp == 1:
            return 0.0
        total = self.dp_sync_time(params)
        gather = 0.0
        if self.s.zero == 2:  # reduce-scatter in backward, then the all-gather (parameter dtype = gradient dtype)
            total = gather = total / 2
        bucket = min(total, total * BUCKET_BYTES / max(params * self.grad_bytes(), 1))
        return max(total - backward_s, bucket) + gather

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
