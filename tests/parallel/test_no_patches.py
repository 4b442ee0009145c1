"""Recompute, tensor parallelism and zero-bubble weight-gradient deferral compose in any order.

Each is declared state the modules read at forward time (`engine.recompute`,
`engine.tensor_parallel.parallelize`, `engine.pipeline.weight_grad`), never a replaced method: for
serial, tp=2 with sequence parallelism, and pp=2 under zb_h1, both orders of applying them give
the same module configuration and bit-identical losses and gradients, and no module instance
carries an attribute that shadows a method of its class.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral
from engine.recompute import apply_recompute
from models import Llama, ModelConfig, init_weights
from models.llama import Linear
from tests.support.distributed import run_distributed

CFG = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, vocab_size=131, max_seq_len=32)
B, T = 2, 8


def _batch(vocab: int, rows: int = B):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (rows, T), generator=g), torch.randint(0, vocab, (rows, T), generator=g)


def _config(model: nn.Module) -> dict:
    """Everything the three passes decide, per module: its class, recompute mode, whether it runs
    inside a checkpoint, whether its matmul is deferred, and how many hooks surround it."""
    return {name: (type(m).__name__, getattr(m, "recompute", None), getattr(m, "checkpointed", None),
                   getattr(m, "weight_grad_store", None) is not None, len(m._forward_pre_hooks), len(m._forward_hooks))
            for name, m in model.named_modules()}


def _shadowed(model: nn.Module) -> list[str]:
    """Instance attributes that hide a method of the module's class (a patched forward, matmul...)."""
    return [f"{name}.{k}" for name, m in model.named_modules() for k in vars(m)
            if callable(getattr(type(m), k, None))]


def _grads(model: nn.Module) -> dict:
    # numpy: torch tensors returned from a spawned world travel through shared memory that the
    # exiting process takes with it
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict) -> None:
    assert a["config"] == b["config"]
    assert a["loss"] == b["loss"]
    assert a["grads"].keys() == b["grads"].keys()
    for n in a["grads"]:
        assert np.array_equal(a["grads"][n], b["grads"][n]), n


# -- serial ------------------------------------------------------------------------------------


def _serial_run(mode: str, order: str) -> dict:
    cfg = ModelConfig(**CFG, tie_embeddings=True)
    with torch.device("meta"):
        model = Llama(cfg)
    init_weights(model, seed=0, n_layers=cfg.n_layers, device="cpu")
    store = WeightGradStore()
    if order == "recompute_first":
        apply_recompute(model, mode)
        enable_weight_grad_deferral([model], store)
    else:
        enable_weight_grad_deferral([model], store)
        apply_recompute(model, mode)
    x, y = _batch(cfg.vocab_size)
    with store.capture((0, 0)):
        loss = model(x, y)
        loss.backward()
    store.flush((0, 0))
    return {"config": _config(model), "loss": float(loss.detach()), "grads": _grads(model), "shadowed": _shadowed(model)}


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_serial_recompute_and_deferral_in_either_order(mode):
    a, b = _serial_run(mode, "recompute_first"), _serial_run(mode, "deferral_first")
    _assert_same(a, b)
    assert a["shadowed"] == b["shadowed"] == []
    blocks = {n: c for n, c in a["config"].items() if n.startswith("layers.") and n.count(".") == 1}
    assert blocks and all(c[1] == mode for c in blocks.values())
    checkpointed = {n.rsplit(".", 1)[1]: c[2] for n, c in a["config"].items() if n.endswith(("attention", "feed_forward"))}
    assert checkpointed == {"attention": mode != "none", "feed_forward": mode == "full"}
    # every Linear defers; the serial model is first and last stage, so its tied head does not
    assert all(c[3] for c in a["config"].values() if c[0] == "Linear")
    assert not a["config"][""][3]


def test_deferred_gradients_match_plain_autograd():
    cfg = ModelConfig(**CFG)
    x, y = _batch(cfg.vocab_size)
    runs = []
    for defer in (False, True):
        with torch.device("meta"):
            model = Llama(cfg)
        init_weights(model, seed=0, n_layers=cfg.n_layers, device="cpu")
        store = WeightGradStore()
        if defer:
            enable_weight_grad_deferral([model], store)
        with store.capture((0, 0)):
            model(x, y).backward()
        held = {id(w) for w, _, _ in store.pending[(0, 0)]}
        linears = {id(m.weight) for m in model.modules() if isinstance(m, Linear)}
        assert held == (linears if defer else set())  # during the I: exactly the Linear weights wait
        store.flush((0, 0))
        runs.append(_grads(model))
    plain, deferred = runs
    assert plain.keys() == deferred.keys()
    for n in plain:
        np.testing.assert_allclose(deferred[n], plain[n], rtol=1e-6, atol=1e-7, err_msg=n)


def test_unknown_recompute_mode_is_refused():
    with torch.device("meta"):
        model = Llama(ModelConfig(**CFG))
    with pytest.raises(ValueError, match="parallel.recompute='some'"):
        apply_recompute(model, "some")


# -- tp=2 with sequence parallelism ------------------------------------------------------------


def _tp_world(rank, world):
    from engine.mesh import build_mesh
    from engine.tensor_parallel import parallelize, sync_tp_grads

    mesh = build_mesh(tp=world)
    cfg = ModelConfig(**CFG)
    x, y = _batch(cfg.vocab_size)
    out = {}
    for mode in ("selective", "full"):
        for order in ("tp_first", "recompute_first", "recompute_last_deferred", "recompute_first_deferred"):
            with torch.device("meta"):
                model = Llama(cfg)
            store = WeightGradStore()
            if order.startswith("recompute_first"):
                apply_recompute(model, mode)
            parallelize(model, mesh, sequence_parallel=True)
            if order.endswith("deferred"):  # deferral follows parallelize: it marks the layers that do the matmuls
                enable_weight_grad_deferral([model], store)
            if not order.startswith("recompute_first"):
                apply_recompute(model, mode)
            init_weights(model, seed=0, n_layers=cfg.n_layers, device="cpu")
            with store.capture((0, 0)):
                loss = model(x, y)
                loss.backward()
            store.flush((0, 0))
            sync_tp_grads([model], mesh)
            out[(mode, order)] = {"config": _config(model), "loss": float(loss.detach()), "grads": _grads(model),
                                  "shadowed": _shadowed(model)}
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp_world, world_size=2)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_tp_sequence_parallel_and_recompute_in_either_order(tp2, mode):
    for res in tp2:  # every rank
        _assert_same(res[(mode, "tp_first")], res[(mode, "recompute_first")])
        _assert_same(res[(mode, "recompute_last_deferred")], res[(mode, "recompute_first_deferred")])
        plain, deferred = res[(mode, "tp_first")], res[(mode, "recompute_first_deferred")]
        assert plain["loss"] == deferred["loss"]
        for n, g in plain["grads"].items():
            np.testing.assert_allclose(deferred["grads"][n], g, rtol=1e-6, atol=1e-7, err_msg=n)
        for r in res.values():
            assert r["shadowed"] == []
        config = res[(mode, "recompute_first_deferred")]["config"]
        parallel = [c for c in config.values() if c[0] in ("ColumnParallelLinear", "RowParallelLinear")]
        assert parallel and all(c[3] for c in parallel)


# -- pp=2 under zb_h1 --------------------------------------------------------------------------


def _pp_world(rank, world):
    from engine.mesh import build_mesh
    from engine.pipeline import PipelineRunner, build_stage_chunks, build_step_actions, sync_tied_grads

    mesh = build_mesh(pp=world)
    cfg = ModelConfig(**CFG, tie_embeddings=True)
    m = 4
    x, y = _batch(cfg.vocab_size, rows=m * B)
    out = {}
    for order in ("recompute_first", "runner_first"):
        (chunk,) = build_stage_chunks(cfg, mesh)
        init_weights(chunk, seed=0, n_layers=cfg.n_layers, device="cpu")
        if order == "recompute_first":
            apply_recompute(chunk, "full")
        runner = PipelineRunner([chunk], mesh, build_step_actions("zb_h1", mesh.pp, m), hidden_shape=(B, T, cfg.dim))
        if order == "runner_first":
            apply_recompute(chunk, "full")
        loss = runner.forward_backward(x if mesh.is_first_stage else None, y if mesh.is_last_stage else None)
        sync_tied_grads([chunk], mesh)
        out[order] = {"config": _config(chunk), "loss": None if loss is None else float(loss),
                      "grads": _grads(chunk), "shadowed": _shadowed(chunk)}
    return out


def test_pipeline_zero_bubble_and_recompute_in_either_order():
    first, last = run_distributed(_pp_world, world_size=2)
    for res in (first, last):
        _assert_same(res["recompute_first"], res["runner_first"])
        assert res["recompute_first"]["shadowed"] == res["runner_first"]["shadowed"] == []
        config = res["recompute_first"]["config"]
        assert all(c[3] for c in config.values() if c[0] == "Linear")
        assert all(c[1] == "full" for n, c in config.items() if n.startswith("layers.") and n.count(".") == 1)
    assert last["recompute_first"]["loss"] is not None
    # the tied head is deferred only on the last stage that is not also first
    assert not first["recompute_first"]["config"][""][3]
    assert last["recompute_first"]["config"][""][3]
