"""Tensor parallelism against the serial model, on gloo with several CPU processes.

Each world size is spawned once (a module fixture runs every scenario and returns plain tensors);
the tests then assert on what came back. Gradients of sharded parameters are gathered to their
global shape through their `ShardMeta` and compared with the serial model's, everywhere.
"""
from __future__ import annotations

import io
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.mesh import build_mesh
from engine.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy,
                                    VocabParallelEmbedding, enter_tp, padded_vocab, parallelize, sync_tp_grads,
                                    validate_tp)
from kernels import get_ops
from models import Llama, ModelConfig, init_weights
from models.shard import iter_params
from tests.support.distributed import run_distributed
from tests.support.serial import serial_step

SEED = 7
B, T = 2, 8
# Odd sizes: vocab 131 pads to 132 at tp=2 and tp=4; GQA 6 heads over 2 KV heads (split at tp=2).
CFG = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=80, vocab_size=131, max_seq_len=32)
# tp=4 > n_kv_heads=2: each KV head is replicated on two ranks.
CFG4 = dict(CFG, n_heads=8)
TOL = dict(rtol=1e-4, atol=1e-6)


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def _gather_global(named_local: dict, group) -> dict:
    """{name: (local tensor, ShardMeta)} on each rank -> {name: global tensor} assembled on every
    rank, asserting every element of every global tensor is covered and replicas agree."""
    mine = {n: (t.detach()[m.local_slices()].clone(), m) for n, (t, m) in named_local.items()}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    out, covered = {}, {}
    for part in everyone:
        for n, (t, m) in part.items():
            if n not in out:
                out[n] = torch.zeros(m.global_shape)
                covered[n] = torch.zeros(m.global_shape, dtype=torch.bool)
            region = m.global_slices()
            if covered[n][region].any():  # a replicated region (norms, shared KV heads): replicas must agree
                torch.testing.assert_close(out[n][region], t, **TOL, msg=lambda e: f"{n} replicas differ: {e}")
            out[n][region] = t
            covered[n][region] = True
    for n, c in covered.items():
        assert bool(c.all()), f"{n}: the shards do not cover the global tensor"
    return out


def _serial(cfg: ModelConfig, x, y):
    model, loss = serial_step(cfg, x, y, seed=SEED)
    with torch.no_grad():
        logits = model(x)
    return model, float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}, logits


def _model_case(mesh, cfg_kw, sequence_parallel, recompute="none"):
    from engine.recompute import apply_recompute

    cfg = ModelConfig(**cfg_kw)
    x, y = _batch(cfg.vocab_size)
    serial, s_loss, s_grads, s_logits = _serial(cfg, x, y)
    with torch.device("meta"):
        model = Llama(cfg)
    parallelize(model, mesh, sequence_parallel=sequence_parallel)
    apply_recompute(model, recompute)
    init_weights(model, seed=SEED, n_layers=cfg.n_layers, device="cpu")
    weights = _gather_global({n: (p, m) for n, p, m in iter_params(model)}, mesh.tp_group)
    loss = model(x, y)
    loss.backward()
    sync_tp_grads([model], mesh)
    grads = _gather_global({n: (p.grad, m) for n, p, m in iter_params(model)}, mesh.tp_group)
    padding_grad = max(float(p.grad[m.shape[0]:].abs().max()) if p.shape[0] > m.shape[0] else 0.0
                       for _, p, m in iter_params(model))
    with torch.no_grad():
        logits = model(x)  # (B, T, vocab/tp incl. padding): this rank's columns
    meta = model.loss_fn  # real columns of this rank
    start = mesh.tp_rank * meta.vocab_local
    logits_err = float((logits[..., :meta.real] - s_logits[..., start:start + meta.real]).abs().max())
    return {"loss": float(loss), "serial_loss": s_loss, "grads": grads, "serial_grads": s_grads,
            "weights": weights, "serial_weights": {n: p.detach().clone() for n, p in serial.named_parameters()},
            "padding_grad": padding_grad, "logits_err": logits_err,
            "local_shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}


def _stages_case(mesh, cfg_kw, sequence_parallel):
    """Two pipeline-stage chunks (layers 0-1 and 2), each sharded, chained on one rank: the hidden
    state between them is (B, T/tp, dim) under sequence parallelism; with tied embeddings the last
    chunk's own embedding copy serves as the head and the two copies' gradients add up."""
    cfg = ModelConfig(**cfg_kw)
    x, y = _batch(cfg.vocab_size)
    _, s_loss, s_grads, _ = _serial(cfg, x, y)
    with torch.device("meta"):
        chunks = [Llama(cfg, layers=(0, 2)), Llama(cfg, layers=(2, 3))]
    for c in chunks:
        parallelize(c, mesh, sequence_parallel=sequence_parallel)
        init_weights(c, seed=SEED, n_layers=cfg.n_layers, device="cpu")
    h = chunks[0](x)
    hidden_shape = tuple(h.shape)
    loss = chunks[1](h, y)
    loss.backward()
    sync_tp_grads(chunks, mesh)
    local = {}
    for c in chunks:
        for n, p, m in iter_params(c):
            if n in local:  # the tied embedding's second copy
                local[n][0].add_(p.grad)
            else:
                local[n] = (p.grad.clone(), m)
    grads = _gather_global(local, mesh.tp_group)
    return {"loss": loss.item(), "serial_loss": s_loss, "grads": grads, "serial_grads": s_grads,
            "hidden_shape": hidden_shape}


def _ckpt_case(mesh, cfg_kw, path, save):
    """Save a sharded model (padded vocabulary) with ``save``; then load the checkpoint into this
    layout and into a serial model, both initialized from another seed, and gather what they hold."""
    from engine import checkpoint as ckpt

    cfg = ModelConfig(**cfg_kw)
    entries = lambda m: [ckpt.Entry(f"model/{n}", p, meta) for n, p, meta in iter_params(m)]  # noqa: E731
    with torch.device("meta"):
        model = Llama(cfg)
    parallelize(model, mesh)
    if save:
        init_weights(model, seed=SEED, n_layers=cfg.n_layers, device="cpu")
        ckpt.save(path, 1, entries(model), model_config=cfg.to_dict(), layout={"tp": mesh.tp}, train_state={})
    init_weights(model, seed=SEED + 1, n_layers=cfg.n_layers, device="cpu")
    ckpt.load(path / "step_000001", entries(model))
    loaded = _gather_global({n: (p, m) for n, p, m in iter_params(model)}, mesh.tp_group)
    with torch.device("meta"):
        serial = Llama(cfg)
    init_weights(serial, seed=SEED + 1, n_layers=cfg.n_layers, device="cpu")
    ckpt.load(path / "step_000001", entries(serial))
    with torch.device("meta"):
        expected = Llama(cfg)
    init_weights(expected, seed=SEED, n_layers=cfg.n_layers, device="cpu")
    return {"loaded": loaded, "serial_loaded": {n: p.detach().clone() for n, p in serial.named_parameters()},
            "expected": {n: p.detach().clone() for n, p in expected.named_parameters()}}


def _layers_case(mesh, sequence_parallel):
    """Column -> row parallel pair, the vocab-parallel embedding and loss against unsharded twins."""
    g, tp, rank = mesh.tp_group, mesh.tp, mesh.tp_rank
    torch.manual_seed(1)
    din, dhid, vocab = 12, 20, 131
    w1, w2, emb = torch.randn(dhid, din), torch.randn(din, dhid), torch.randn(vocab, din)
    x = torch.randn(B, T, din)
    ids, tgt = _batch(vocab)
    # serial twin
    xs, w1s, w2s, embs = (t.clone().requires_grad_() for t in (x, w1, w2, emb))
    ys = F.linear(F.linear(xs, w1s), w2s)
    hs = F.embedding(ids, embs)
    loss_s = F.cross_entropy(F.linear(hs + ys, embs).reshape(-1, vocab), tgt.reshape(-1))
    loss_s.backward()
    # parallel
    col = ColumnParallelLinear(din, dhid, group=g, sequence_parallel=sequence_parallel)
    row = RowParallelLinear(dhid, din, group=g, sequence_parallel=sequence_parallel)
    vemb = VocabParallelEmbedding(vocab, din, group=g, sequence_parallel=sequence_parallel)
    ce = VocabParallelCrossEntropy(get_ops("torch"), vocab_size=vocab, group=g)
    with torch.no_grad():
        for mod, full in ((col, w1), (row, w2), (vemb, emb)):
            m = mod.shard_meta["weight"]
            mod.weight.zero_()
            mod.weight[m.local_slices()] = full[m.global_slices()]
    xp = x.clone()
    if sequence_parallel:
        xp = x.chunk(tp, dim=1)[rank].clone()
    xp.requires_grad_()
    y = row(col(xp))  # (B, T[/tp], din)
    h = vemb(ids)
    logits = F.linear(enter_tp(h + y, g, sequence_parallel), vemb.weight)  # tied head, vocab-parallel
    loss = ce(logits, tgt)
    loss.backward()
    grads = _gather_global({"w1": (col.weight.grad, col.shard_meta["weight"]),
                            "w2": (row.weight.grad, row.shard_meta["weight"]),
                            "emb": (vemb.weight.grad, vemb.shard_meta["weight"])}, g)
    dx = xp.grad
    if sequence_parallel:
        parts = [torch.zeros_like(dx) for _ in range(tp)]
        dist.all_gather(parts, dx.contiguous(), group=g)
        dx = torch.cat(parts, dim=1)
    return {"loss": loss.item(), "serial_loss": loss_s.item(), "grads": grads,
            "serial_grads": {"w1": w1s.grad, "w2": w2s.grad, "emb": embs.grad}, "dx": dx, "serial_dx": xs.grad,
            "y": y.detach(), "serial_y": ys.detach().chunk(tp, dim=1)[rank] if sequence_parallel else ys.detach()}


@contextmanager
def _count_collectives():
    """Count torch.distributed collectives (and the elements they move) while active."""
    counts = {"order": []}
    names = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather", "all_gather_into_tensor",
             "reduce_scatter_tensor", "reduce_scatter", "broadcast")
    saved = {n: getattr(dist, n) for n in names}

    def wrap(n, f):
        def counted(tensor, *a, **kw):
            c = counts.setdefault(n, [0, 0])
            c[0] += 1
            c[1] = max(c[1], tensor.numel() if isinstance(tensor, torch.Tensor) else 0)
            counts["order"].append((n, tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None))
            return f(tensor, *a, **kw)
        return counted

    for n, f in saved.items():
        setattr(dist, n, wrap(n, f))
    try:
        yield counts
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


class _saved_shapes(torch.autograd.graph.saved_tensors_hooks):
    """{storage: (bytes, shape)} of what autograd saves while active, ``skip`` tensors excluded
    (as `engine.cost_model.saved_tensor_bytes` counts them)."""

    def __init__(self, skip):
        self.shapes = {}
        skip = {t.untyped_storage().data_ptr() for t in skip}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                self.shapes[st.data_ptr()] = (st.nbytes(), tuple(t.shape))
            return t

        super().__init__(pack, lambda t: t)


def _comm_case(mesh, sequence_parallel):
    cfg = ModelConfig(**CFG)
    with torch.device("meta"):
        model = Llama(cfg)
    parallelize(model, mesh, sequence_parallel=sequence_parallel)
    init_weights(model, seed=SEED, n_layers=cfg.n_layers, device="cpu")
    t_local = T // mesh.tp if sequence_parallel else T
    h = torch.randn(B, t_local, cfg.dim, requires_grad=True)
    block = model.layers["1"]
    saved = _saved_shapes([*model.parameters(), h])
    with _count_collectives() as fwd, saved:
        out = block(h)
    with _count_collectives() as bwd:
        out.sum().backward()
    import gc

    from engine.tensor_parallel import SeqShard
    cached_after_backward = sum(isinstance(o, SeqShard) and o.full is not None for o in gc.get_objects())
    # the same block with the gathered inputs saved as they are (what full recompute selects): the
    # parts' declared mode says "inside the block's checkpoint", the block itself runs no checkpoint
    block.attention.recompute = block.feed_forward.recompute = "full"
    saved_gathered = _saved_shapes([*model.parameters(), h])
    with saved_gathered:
        out = block(h)
    out.sum().backward()
    x, y = _batch(cfg.vocab_size)
    logits = model.logits(torch.randn(B, t_local, cfg.dim)).detach().requires_grad_()
    with _count_collectives() as loss_fwd:
        loss = model.loss_fn(logits, y)
    with _count_collectives() as loss_bwd:
        loss.backward()
    summarize = lambda c: {k: v[0] for k, v in c.items() if k != "order"}  # noqa: E731
    return {"fwd": summarize(fwd), "bwd": summarize(bwd), "bwd_order": bwd["order"],
            "saved": saved.shapes, "saved_gathered": saved_gathered.shapes,
            "cached_after_backward": cached_after_backward,
            "loss_fwd": summarize(loss_fwd),
            "loss_bwd": summarize(loss_bwd), "loss_max_numel": max(v[1] for k, v in loss_fwd.items() if k != "order"),
            "logits_numel": logits.numel()}


def _inplace_case(mesh):
    """The non-SP mappings all-reduce in place: no clone in forward or backward of a column -> row
    pair (whose values the layers case checks against serial); a leaf that requires grad, which
    must not be modified, is copied first."""
    g = mesh.tp_group
    torch.manual_seed(2)
    col = ColumnParallelLinear(12, 20, group=g)
    row = RowParallelLinear(20, 12, group=g)
    for m in (col, row):
        torch.nn.init.normal_(m.weight)
    x = torch.randn(B, T, 12, requires_grad=True)
    clones = []
    real = torch.Tensor.clone
    torch.Tensor.clone = lambda self, *a, **k: clones.append(tuple(self.shape)) or real(self, *a, **k)
    try:
        y = row(col(x))
        y.square().sum().backward()
    finally:
        torch.Tensor.clone = real
    leaf = torch.full((3,), float(mesh.tp_rank + 1), requires_grad=True)
    from engine.tensor_parallel.mappings import ReduceFromTP
    reduced = ReduceFromTP.apply(leaf, g)
    return {"clones": clones, "leaf": leaf.detach().clone(), "reduced": reduced.detach().clone()}


def _twice_case(mesh):
    with torch.device("meta"):
        model = Llama(ModelConfig(**CFG))
    parallelize(model, mesh)
    try:
        parallelize(model, mesh)
    except ValueError as e:
        return str(e)
    return "no error"


def _world(rank, world, cases):
    torch.manual_seed(0)
    mesh = build_mesh(tp=world)
    out = {}
    for key, kind, *args in cases:
        out[key] = {"model": _model_case, "layers": _layers_case, "comm": _comm_case,
                    "stages": _stages_case, "ckpt": _ckpt_case,
                    "twice": _twice_case, "inplace": _inplace_case}[kind](mesh, *args)
    buf = io.BytesIO()  # tensors as bytes: shared-memory handles would die with this process
    torch.save(out, buf)
    return buf.getvalue()


def _spawn(world, cases):
    return [torch.load(io.BytesIO(b), weights_only=False) for b in run_distributed(_world, world, args=(cases,))]


CASES2 = [("layers", "layers", False), ("layers_sp", "layers", True),
          ("gqa_split", "model", CFG, False), ("tied_sp", "model", dict(CFG, tie_embeddings=True), True),
          ("comm", "comm", False), ("comm_sp", "comm", True),
          ("untied_sp", "model", CFG, True), ("untied_sp_selective", "model", CFG, True, "selective"),
          ("tied_sp_full", "model", dict(CFG, tie_embeddings=True), True, "full"),
          ("stages_tied_sp", "stages", dict(CFG, tie_embeddings=True), True), ("twice", "twice"),
          ("inplace", "inplace")]
CASES4 = [("ckpt", "ckpt", CFG4, None, False),  # path filled in by the fixture
          ("gqa_replicated_tied", "model", dict(CFG4, tie_embeddings=True), False),
          ("gqa_replicated_sp", "model", CFG4, True)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp_ckpt")


@pytest.fixture(scope="module")
def tp2(ckpt_dir):
    return _spawn(2, CASES2 + [("ckpt", "ckpt", CFG4, ckpt_dir, True)])


@pytest.fixture(scope="module")
def tp4(tp2, ckpt_dir):  # loads the checkpoint the tp=2 world wrote
    return _spawn(4, [(k, kind, *(ckpt_dir if a is None else a for a in args)) for k, kind, *args in CASES4])


def _assert_model_matches(res):
    assert abs(res["loss"] - res["serial_loss"]) <= 1e-5 * abs(res["serial_loss"]), (res["loss"], res["serial_loss"])
    assert set(res["grads"]) == set(res["serial_grads"])
    for n, g in res["serial_grads"].items():
        torch.testing.assert_close(res["weights"][n], res["serial_weights"][n], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(res["grads"][n], g, **TOL, msg=lambda m: f"{n}: {m}")
    assert res["padding_grad"] == 0.0  # padded vocabulary rows never learn
    assert res["logits_err"] < 1e-5


@pytest.mark.parametrize("sp", [False, True], ids=["plain", "sequence_parallel"])
def test_parallel_layers_match_unsharded_twins(tp2, sp):
    for rank, out in enumerate(tp2):
        res = out["layers_sp" if sp else "layers"]
        assert abs(res["loss"] - res["serial_loss"]) <= 1e-5 * res["serial_loss"]
        torch.testing.assert_close(res["y"], res["serial_y"], **TOL)
        torch.testing.assert_close(res["dx"], res["serial_dx"], **TOL)
        for n, g in res["serial_grads"].items():
            torch.testing.assert_close(res["grads"][n], g, **TOL, msg=lambda m: f"rank {rank} {n}: {m}")


def test_tp2_gqa_split_kv_matches_serial(tp2):
    for out in tp2:
        res = out["gqa_split"]
        _assert_model_matches(res)
        shapes = res["local_shapes"]
        assert shapes["layers.0.attention.wq.weight"] == (24, 48)  # 3 of 6 heads
        assert shapes["layers.0.attention.wk.weight"] == (8, 48)  # 1 of 2 KV heads (head_dim 8)
        assert shapes["layers.0.feed_forward.w2.weight"] == (48, 40)
        assert shapes["tok_embeddings.weight"] == (66, 48) and shapes["output.weight"] == (66, 48)  # 131 -> 132


def test_tp2_tied_embeddings_sequence_parallel_matches_serial(tp2):
    for out in tp2:
        _assert_model_matches(out["tied_sp"])
        assert "output.weight" not in out["tied_sp"]["grads"]


@pytest.mark.parametrize("case", ["untied_sp", "untied_sp_selective", "tied_sp_full"])
def test_tp2_sequence_parallel_regather_matches_serial(tp2, case):
    """The column-parallel matmuls (the untied head's too) save the sequence shard and re-gather
    it in backward; alone, under selective recompute (the MLP's; the attention's checkpoint keeps
    its gathered input) and under full recompute (the gathered inputs are recomputed)."""
    for out in tp2:
        _assert_model_matches(out[case])


def test_tp4_replicated_kv_tied_matches_serial(tp4):
    for out in tp4:
        res = out["gqa_replicated_tied"]
        _assert_model_matches(res)
        assert res["local_shapes"]["layers.2.attention.wk.weight"] == (6, 48)  # one whole KV head per rank
        assert res["local_shapes"]["tok_embeddings.weight"] == (33, 48)


def test_tp4_replicated_kv_sequence_parallel_matches_serial(tp4):
    for out in tp4:
        _assert_model_matches(out["gqa_replicated_sp"])


def test_tp2_pipeline_stage_chunks_with_tied_embeddings_and_sp_match_serial(tp2):
    for rank, out in enumerate(tp2):
        res = out["stages_tied_sp"]
        assert res["hidden_shape"] == (B, T // 2, 48)  # what the pipeline sends between stages
        assert abs(res["loss"] - res["serial_loss"]) <= 1e-5 * res["serial_loss"]
        assert set(res["grads"]) == set(res["serial_grads"])
        for n, g in res["serial_grads"].items():
            torch.testing.assert_close(res["grads"][n], g, **TOL, msg=lambda m: f"rank {rank} {n}: {m}")


@pytest.mark.parametrize("world", ["tp2", "tp4"])
def test_checkpoint_with_padded_vocab_loads_into_any_tp_and_serial(world, request, ckpt_dir):
    import json

    manifest = json.loads((ckpt_dir / "step_000001" / "manifest.json").read_text())
    assert manifest["tensors"]["model/output.weight"]["global_shape"] == [131, 48]  # padding is never stored
    for out in request.getfixturevalue(world):
        res = out["ckpt"]
        for n, want in res["expected"].items():
            torch.testing.assert_close(res["loaded"][n], want, rtol=0, atol=0, msg=n)
            torch.testing.assert_close(res["serial_loaded"][n], want, rtol=0, atol=0, msg=n)


def test_block_communication_is_megatrons(tp2):
    for out in tp2:
        res = out["comm"]
        assert res["fwd"] == {"all_reduce": 2}  # g after attention and after the MLP
        assert res["bwd"] == {"all_reduce": 2}  # f before attention and before the MLP


def test_block_communication_with_sequence_parallelism(tp2):
    for out in tp2:
        res = out["comm_sp"]
        assert res["fwd"] == {"all_gather_single": 2, "reduce_scatter_single": 2}
        # + one re-gather of the saved shard per attention and per MLP (q/k/v and gate/up share it)
        assert res["bwd"] == {"all_gather_single": 4, "reduce_scatter_single": 2}
        assert res["cached_after_backward"] == 0  # the last user dropped the re-gathered sequence
    assert tp2[0]["comm_sp"]["bwd_order"] == tp2[1]["comm_sp"]["bwd_order"]  # same order on every rank


def test_sequence_parallel_block_saves_the_shard_not_the_gathered_input(tp2):
    dim, tp, f32 = CFG["dim"], 2, 4
    full_seq = B * T * dim * f32  # a (B, T, dim) storage (F.linear may save it as a (B*T, dim) view)
    for out in tp2:
        res = out["comm_sp"]
        # nothing of the full sequence at hidden width is kept for backward (other saved tensors
        # are narrower: tp-sharded heads and MLP units, or per-position statistics)
        assert [s for s in res["saved"].values() if s[0] == full_seq] == []
        # before: the attention's and the MLP's gathered inputs
        assert len([s for s in res["saved_gathered"].values() if s[0] == full_seq]) == 2
        saved = sum(n for n, _ in res["saved"].values())
        before = sum(n for n, _ in res["saved_gathered"].values())
        # per sub-layer: the (B, T/tp, dim) shard instead of the (B, T, dim) gathered input
        assert before - saved == 2 * B * (T - T // tp) * dim * f32


@pytest.mark.parametrize("case", ["comm", "comm_sp"])
def test_vocab_parallel_loss_never_gathers_logits(tp2, case):
    for out in tp2:
        res = out[case]
        assert set(res["loss_fwd"]) == {"all_reduce"} and res["loss_fwd"]["all_reduce"] <= 3
        assert res["loss_bwd"] == {}  # the gradient is local
        assert res["loss_max_numel"] <= 2 * B * T < res["logits_numel"]  # one or two values per token


def test_parallelize_twice_is_an_error(tp2):
    assert all("already tensor-parallel" in out["twice"] for out in tp2)


def test_vocab_padding():
    assert padded_vocab(131, 2) == 132 and padded_vocab(131, 4) == 132 and padded_vocab(128, 4) == 128


@pytest.mark.parametrize("kw, tp, message", [
    (dict(CFG), 4, r"parallel.tp=4 does not divide model.n_heads=6"),
    (dict(CFG, ffn_dim=81), 2, r"parallel.tp=2 does not divide model.ffn_dim=81"),
    (dict(CFG, n_heads=12), 3, r"neither divides model.n_kv_heads=2 .* nor is a multiple of it"),
])
def test_unshardable_models_are_rejected_early(kw, tp, message):
    with pytest.raises(ValueError, match=message):
        validate_tp(ModelConfig(**kw), tp)


def test_sequence_parallel_needs_divisible_seq_len():
    with pytest.raises(ValueError, match=r"train.seq_len=30 is not divisible by parallel.tp=4"):
        validate_tp(ModelConfig(**CFG4), 4, seq_len=30, sequence_parallel=True)


def test_tp_all_reduces_run_in_place_where_autograd_allows(tp2):
    for rank, res in enumerate(tp2):
        case = res["inplace"]
        assert case["clones"] == [], case["clones"]
        assert case["leaf"].tolist() == [rank + 1.0] * 3   # the leaf itself untouched
        assert case["reduced"].tolist() == [3.0] * 3
