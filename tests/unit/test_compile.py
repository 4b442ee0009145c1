"""train.compile=true (engine/compile.py): each transformer block compiled whole, with no graph break,
computing what eager does. The serial run uses inductor (C++ code generated and compiled on this
CPU); the parallel layouts are in tests/parallel/test_compile.py."""
import pytest
import torch

from engine.config import ConfigError
from tests.support.launch import SMALL_MODEL, assert_runs_match, compose
from tests.support.trainer_world import run_compiled_trainers

STEPS = 10


def _run_in_process(runs):
    import torch.distributed as dist

    try:
        return run_compiled_trainers(0, 1, runs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_serial_inductor_matches_eager_over_10_steps(data_dir, tmp_path, serial_run):
    """Inductor-compiled blocks against the eager serial run (the session's shared reference)."""
    model = SMALL_MODEL   # the eager reference is shared with tests/launch/test_data_parallel.py
    eager = serial_run(model, STEPS)
    out = _run_in_process({"inductor": [*model, f"data.dir={data_dir}", f"run_dir={tmp_path}", f"train.max_steps={STEPS}",
                                        "train.compile=true", "train.compile_backend=inductor"]})["inductor"]
    assert out["graph_breaks"] == 0
    assert out["blocks_compiled"] == [True] * 3 and out["graphs"] == 1   # the 3 blocks share one graph
    assert_runs_match(out["records"], eager)


def test_compiler_unavailable_is_a_clear_error(monkeypatch, data_dir, tmp_path):
    """No C++ compiler on a CPU (simulated): the launch stops before any model or data work, naming
    the fixes; an unknown backend is refused by the config check."""
    import engine.compile as comp
    from engine.trainer import Trainer

    monkeypatch.setattr(comp.shutil, "which", lambda name: None)
    cfg = compose([*SMALL_MODEL, f"data.dir={tmp_path / 'absent'}", f"run_dir={tmp_path / 'run'}", "train.compile=true"])
    try:
        with pytest.raises(ConfigError, match=r"no C\+\+ compiler .* is on PATH; install one .*CXX.*"
                                              r"train.compile_backend=aot_eager"):
            Trainer(cfg)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not (tmp_path / "absent").exists() and not (tmp_path / "run").exists()
    assert comp.compiler_problem("aot_eager", torch.device("cpu")) is None   # no code generation: no compiler needed
    from engine.config import validate
    with pytest.raises(ConfigError, match="train.compile_backend='tvm' is not one of inductor, aot_eager"):
        validate(compose([*SMALL_MODEL, "train.compile_backend=tvm"]))


def _tiny(kernels="torch", layers=2):
    from models import Llama, ModelConfig, init_weights

    cfg = ModelConfig(dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64)
    return init_weights(Llama(cfg, kernels=kernels), seed=0, n_layers=layers)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _swap_storages(model):
    """Swap the storage of same-shaped weights (wq↔wo, wk↔wv of each block) as ZeRO's move into flat
    buffers does to every parameter (`p.data = ...`): each address the store indexed now holds another
    Parameter, the case where a stale index would hand one weight's gradient to another."""
    with torch.no_grad():
        for block in model.layers.values():
            att = block.attention
            for a, b in ((att.wq, att.wo), (att.wk, att.wv)):
                a.weight.data, b.weight.data = b.weight.data, a.weight.data


@pytest.mark.parametrize("recompute,precision", [("full", "fp32"), ("selective", "bf16")])
def test_compiled_block_defers_weight_grads_to_the_store(recompute, precision):
    """Zero-bubble inside a compiled block: the I-style backward leaves every block weight's gradient
    unset and stashed (one private input copy per deferred matmul); the W
    flush then gives the eager gradients (recompute modes and bf16 autocast included), on the right
    Parameters after their storage moved since registration. Outside an I the gradients land at once."""
    import contextlib

    from torch._dynamo.utils import counters

    from engine.compile import compile_blocks
    from engine.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral
    from engine.recompute import apply_recompute

    def autocast():
        return torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    x = torch.randint(0, 64, (2, 8))
    eager = _tiny()
    apply_recompute(eager, recompute)
    _swap_storages(eager)
    with autocast():
        loss = eager(x, x)
    loss.backward()
    model = _tiny()
    apply_recompute(model, recompute)
    store = WeightGradStore()
    enable_weight_grad_deferral([model], store)
    _swap_storages(model)   # after registration
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager", seq_len=8, device=x.device)
    with store.capture((0, 0)):
        with autocast():
            loss = model(x, x)
        loss.backward()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    block_weights = [n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2]
    assert len(block_weights) == 2 * 7
    assert all(dict(model.named_parameters())[n].grad is None for n in block_weights)
    stash = store.pending[(0, 0)]
    assert len(stash) == len(block_weights) + 1   # + the untied output head (eager)
    # a private input copy per deferred matmul (no graph buffer is held by the stash)
    assert len({x_.data_ptr() for _, x_, _ in stash[1:]}) == len(block_weights)
    store.flush((0, 0))
    tol = dict(rtol=1e-6, atol=1e-7) if precision == "fp32" else dict(rtol=1e-2, atol=1e-4)
    got, want = _grads(model), _grads(eager)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=n)
    model.zero_grad(set_to_none=True)
    with autocast():   # no I being captured: each weight gradient is summed inside the backward op
        loss = model(x, x)
    loss.backward()
    assert not store.pending and counters["stats"]["unique_graphs"] == 1
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **tol, msg=n)


def test_compiled_block_with_triton_kernels_matches_eager():
    """kernels=triton (run by Triton's interpreter on this CPU): the kernels are custom ops the
    compiler calls, not traces, so a block still compiles whole and computes what eager does."""
    from torch._dynamo.utils import counters

    from engine.compile import compile_blocks

    x = torch.randint(0, 64, (1, 8))
    eager = _tiny("triton", layers=1)
    eager(x, x).backward()
    model = _tiny("triton", layers=1)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager", seq_len=8, device=x.device)
    loss = model(x, x)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    got, want = _grads(model), _grads(eager)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7, msg=n)
