"""The NCCL contract the multi-rank tests run under, and NCCL's device rule checked on a CPU.

- The layer (`tests/support/nccl_contract.py`) does what NCCL does where gloo is more forgiving: one Work
  per p2p batch, no non-contiguous tensor, no tensor off the process's device.
- The pipeline runtime as it was before the coalesced-Work fix (works paired with ops one to one)
  fails under it, as it would have on GPUs at step 1.
- Device placement: one training step of several layouts runs with the mesh's device set to
  ``meta`` (PyTorch's data-less device) under the layer in dry mode, so every tensor handed to a
  collective or p2p op must be on the mesh's device — a host tensor (``.cpu()``, or a tensor made
  without ``device=``) is refused, as NCCL would refuse it. This covers the TP mappings, the
  vocab-parallel loss, pipeline p2p, the tied-embedding exchange, the DP reducer, the gradient
  norm, the loss reduce, the ZeRO-1 broadcast and ZeRO-2's reduce-scatter and all-gather in one go.
"""
import dataclasses
import re
import sys

import pytest
import torch

from tests.support.distributed import run_distributed
from tests.support.launch import SMALL_MODEL

# -- the layer itself ---------------------------------------------------------------------------


def _layer_rules(rank, world):
    import torch.distributed as dist

    from tests.support.nccl_contract import ContractViolation

    peer = 1 - rank
    x = torch.full((4,), float(rank))
    buf = torch.empty(4)
    ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, buf, peer)]
    works = dist.batch_isend_irecv(ops)
    works[0].wait()
    works[0].wait()                      # waiting twice is a no-op, as on NCCL
    refused = []
    for bad in (torch.zeros(4, 4).t(), torch.zeros(4, device="meta")):
        try:
            dist.all_reduce(bad)
        except ContractViolation as e:
            refused.append(str(e))
    return len(works), float(buf[0]), refused


def _layer_rules_then_pipeline_step(rank, world):
    """The layer's rules, then the fixed runtime's pp=2 step, in one world: the refused calls never
    reach gloo and the p2p batch completes, so the group is clean for the step (a world of its own
    would cost another two processes' start)."""
    return _layer_rules(rank, world), _pipeline_step(rank, world, False)


@pytest.fixture(scope="module")
def contract_world():
    return run_distributed(_layer_rules_then_pipeline_step, world_size=2)


def test_layer_coalesces_p2p_and_refuses_what_nccl_refuses(contract_world):
    for rank, ((n_works, received, refused), _) in enumerate(contract_world):
        assert n_works == 1                       # gloo alone returns 2
        assert received == float(1 - rank)
        assert len(refused) == 2
        assert "not contiguous" in refused[0] and "is on meta, not on the process's cpu device" in refused[1]


def _pipeline_step(rank, world, pair_works_with_ops):
    """A pp=2 1F1B step; with ``pair_works_with_ops`` the runtime pairs batch_isend_irecv's works
    with its ops one to one, as it did before the fix."""
    import torch.distributed as dist

    import engine.pipeline.runtime as runtime
    from engine.mesh import build_mesh
    from engine.pipeline import PipelineRunner, build_stage_chunks, build_step_actions
    from models import ModelConfig, init_weights

    if pair_works_with_ops:
        runtime.post_p2p = lambda ops: dist.batch_isend_irecv(ops)
    mesh = build_mesh(pp=world)
    cfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=101, max_seq_len=16)
    chunks = [init_weights(c, seed=0, n_layers=3, device="cpu") for c in build_stage_chunks(cfg, mesh)]
    runner = PipelineRunner(chunks, mesh, build_step_actions("1f1b", mesh.pp, 4), hidden_shape=(2, 8, cfg.dim))
    tokens = torch.randint(0, cfg.vocab_size, (8, 9), generator=torch.Generator().manual_seed(0))
    try:
        loss = runner.forward_backward(tokens[:, :-1] if mesh.is_first_stage else None,
                                       tokens[:, 1:] if mesh.is_last_stage else None)
    except (KeyError, RuntimeError) as e:   # RuntimeError: the peer of a rank that failed went away
        return f"{type(e).__name__}: {e}"
    return None if loss is None else float(loss)


def test_runtime_before_the_fix_fails_under_the_contract_and_passes_after(contract_world):
    broken = run_distributed(_pipeline_step, world_size=2, args=(True,))
    assert any(r is not None and re.match(r"KeyError: Action\('\d+R[FB]\d+'\)", r) for r in broken), broken
    fixed = [step for _, step in contract_world]
    assert fixed[0] is None and 3 < fixed[1] < 6, fixed


# -- NCCL's device rule, on the meta device ------------------------------------------------------

LAYOUTS = {
    "tp2_pp2_sp_zb_h1_tied": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                              "parallel.schedule=zb_h1", "model.tie_embeddings=true"],
    # flexible layouts (issue 15): empty end chunks, and 3 micro-batches (12 / (2 × dp 2)) over pp 2
    "pp2_dp2_zero1_interleaved": ["parallel.pp=2", "parallel.dp=2", "optim.zero=1", "model.n_layers=4",
                                  "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
                                  "train.global_batch_size=12", "parallel.layers_per_stage=[0,2,2,0]"],
    "tp2_dp2_zero1_recompute": ["parallel.tp=2", "parallel.dp=2", "optim.zero=1", "parallel.recompute=selective"],
    "dp4_tied": ["parallel.dp=4", "model.tie_embeddings=true"],
    "pp2_dp2_zero2_tied": ["parallel.pp=2", "parallel.dp=2", "optim.zero=2", "model.tie_embeddings=true",
                           "parallel.layers_per_stage=[3,0]"],   # a head-only last stage
    # the V: rank 0 sends to and receives from rank 1 in one batch; deferred W's start reduce-scatters
    "pp2_dp2_zero2_zbv_tied": ["parallel.pp=2", "parallel.dp=2", "optim.zero=2", "model.tie_embeddings=true",
                               "parallel.schedule=zbv", "parallel.virtual_stages=2", "model.n_layers=4"],
}
# run after LAYOUTS, with the gradient norm summed on the host as before the fix
HOST_NORM_LAYOUTS = {"dp4_host_norm": ["parallel.dp=4"]}


def _meta_steps(rank, world, data_dir, run_root, layouts, host_norm_layouts=None):
    """One step of each of ``layouts`` on the meta device; then, with the gradient norm as it was before
    the fix (summed in a host tensor, then all-reduced), one step of each of ``host_norm_layouts``."""
    import engine.trainer as trainer_mod
    from tests.support.launch import compose
    from tests.support.nccl_contract import ContractViolation, install

    build = trainer_mod.build_mesh
    trainer_mod.build_mesh = lambda **kw: dataclasses.replace(build(**kw), device=torch.device("meta"))

    def clip_on_host(refs, max_norm, device):
        import torch.distributed as dist

        total = torch.zeros((), dtype=torch.float64)
        dist.all_reduce(total)
        return total

    out = {}
    runs = [(name, overrides, False) for name, overrides in layouts.items()]
    runs += [(name, overrides, True) for name, overrides in (host_norm_layouts or {}).items()]
    for name, overrides, old_grad_norm in runs:
        if old_grad_norm:
            trainer_mod.clip_grad_norm = clip_on_host
        trainer = trainer_mod.Trainer(compose([*SMALL_MODEL, *overrides, f"data.dir={data_dir}",
                                               f"run_dir={run_root}/{name}"]))
        contract = install("meta", dry=True)
        contract.calls.clear()
        try:
            scalars, lr = trainer._step()
            trainer.optimizer.step(lr)          # the ZeRO broadcast
            out[name] = {"device": str(scalars.device), "calls": dict(contract.calls), "violations": []}
        except ContractViolation as e:
            out[name] = {"device": None, "calls": dict(contract.calls), "violations": [str(e)]}
        contract.uninstall()
        torch.distributed._tandem_nccl_contract = None
    return out


@pytest.fixture(scope="module")
def meta_world(data_dir, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("meta")
    return run_distributed(_meta_steps, world_size=4,
                           args=(str(data_dir), str(run_root), LAYOUTS, HOST_NORM_LAYOUTS), nccl_contract=False)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_communicated_tensor_is_on_the_mesh_device(meta_world, layout):
    for rank, results in enumerate(meta_world):
        res = results[layout]
        assert res["violations"] == [] and res["device"] == "meta", (rank, res)
        calls = res["calls"]
        assert calls.get("all_reduce", 0) >= 2, calls          # gradient norm and loss, at least
        if "pp2" in layout:
            assert calls.get("batch_isend_irecv", 0) > 0, calls
        if "zero1" in layout:
            assert calls.get("broadcast", 0) > 0, calls
        if "zero2" in layout:   # the gradient reduce-scatter and the parameter all-gather, on the device
            assert calls.get("reduce_scatter_single", 0) > 0 and calls.get("all_gather_single", 0) > 0, calls
        if "_sp_" in layout:
            assert calls.get("all_gather_single", 0) > 0 and calls.get("reduce_scatter_single", 0) > 0, calls


def test_a_gradient_norm_summed_on_the_host_is_refused(meta_world):
    """The check catches the bug it is for: the old clip_grad_norm's host tensor. (It ran in a 2-rank
    world of its own, at dp=2; it now runs last in the meta world, at dp=4.)"""
    for results in meta_world:
        (violation,) = results["dp4_host_norm"]["violations"]
        assert violation.startswith("all_reduce: tensor argument 0 is on cpu, not on the process's meta device")


def test_torchrun_launches_of_the_tests_run_under_the_contract():
    """tests/support/launch.py's environment (what every torchrun test launch gets) puts each process under the
    layer before the training script runs."""
    import subprocess

    from tests.support.launch import _torchrun_cmd

    _, env = _torchrun_cmd(1, [])
    probe = ("import torch.distributed as dist; layer = getattr(dist, '_tandem_nccl_contract', None); "
             "print(type(layer).__name__, dist.batch_isend_irecv.__name__ == 'batch_isend_irecv' and layer is not None)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["NcclContract", "True"], out.stderr[-2000:]
