"""A training step reads at most one value back to the host: the all-reduced [loss, stop flag,
save-failed flag, gradient norm] at its end (issue 14). On a GPU each further read (`.item()`,
`bool(tensor)`, `.cpu()`, ...) stalls the host until the device has drained its queue."""
import torch

from tests.support.distributed import run_distributed
from tests.support.host_reads import counting_host_reads, host_reads_per_step, on_device_path
from tests.support.launch import SMALL_MODEL


def _overrides(data_dir, run_dir, *extra):
    # 4 micro-batches per step: a read per micro-batch (the loss's backward scale) would show 4 times
    return [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", "kernels=torch", *extra]


def _assert_at_most_one(per_step, what="serial"):
    for reads in map(on_device_path, per_step):
        assert len(reads) <= 1, f"{what}: {len(reads)} host reads in one training step: {reads}"
        assert [name for name, _ in reads] == ["tolist"], reads  # the step's one agreed read


def test_the_counter_sees_each_kind_of_host_read():
    t = torch.ones(2)
    with counting_host_reads() as seen:
        t[0].item(), t.tolist(), t.cpu(), t.numpy(), bool(t[0]), float(t[0]), int(t[0])
        if t[1]:
            pass
    assert [r[0] for r in seen] == ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                                    "__bool__"]


def test_serial_step_reads_the_host_once(data_dir, tmp_path):
    import torch.distributed as dist

    try:
        per_step = host_reads_per_step(0, 1, {"pp1": _overrides(data_dir, tmp_path / "pp1")}, steps=1)["pp1"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _assert_at_most_one(per_step)


LAYOUTS = {"pp2-1f1b": ["parallel.pp=2", "parallel.schedule=1f1b"],
           "pp2-zb_h1": ["parallel.pp=2", "parallel.schedule=zb_h1"],
           "dp2-zero1": ["parallel.dp=2", "optim.zero=1"],
           "dp2-zero2": ["parallel.dp=2", "optim.zero=2"]}


def test_two_rank_steps_read_the_host_once_per_rank(data_dir, tmp_path):
    """pp=2 under 1F1B and zero-bubble (deferred weight gradients), dp=2 with ZeRO-1 (overlapped
    gradient all-reduce, bucketed parameter broadcasts) and ZeRO-2 (overlapped reduce-scatter, norm
    over the slices, in-place all-gather); one spawned world runs the four."""
    runs = {name: _overrides(data_dir, tmp_path / name, *layout) for name, layout in LAYOUTS.items()}
    results = run_distributed(host_reads_per_step, 2, (runs, 1))
    for rank, by_run in enumerate(results):
        for name in runs:
            _assert_at_most_one(by_run[name], f"{name}, rank {rank}")
            # the same all-reduce brought both ranks' peak memory (RSS here), in global-rank order
            peaks = by_run[name + ":peak_mem_mib"][0]
            assert len(peaks) == 2 and all(p > 10 for p in peaks), (name, peaks)
            assert peaks == results[0][name + ":peak_mem_mib"][0], (name, rank)


def test_the_target_check_is_a_debug_switch_that_costs_reads(data_dir, tmp_path):
    """train.check_targets=true checks each step's targets on the device: the counter sees it,
    so the default run's single read is not the counter missing things."""
    import torch.distributed as dist

    try:
        run = _overrides(data_dir, tmp_path / "check", "train.check_targets=true")
        per_step = host_reads_per_step(0, 1, {"check": run}, steps=1)["check"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    reads = on_device_path(per_step[0])
    assert len(reads) > 1 and any("check" in where or "cross_entropy" in where for _, where in reads), reads


def test_rope_tables_are_built_once_per_model_and_device(monkeypatch):
    """The cos/sin tables (float64 trigonometry) are a function of (seq_len, device, dtype): built at
    the first forward, then shared by every layer and micro-batch of the model."""
    import models.llama as llama
    from models import ModelConfig, init_weights

    built = []
    real = llama.rope_cos_sin
    monkeypatch.setattr(llama, "rope_cos_sin", lambda *a, **k: built.append(a) or real(*a, **k))
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64)
    model = init_weights(llama.Llama(cfg), seed=0, n_layers=cfg.n_layers)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(x, x).backward()
    model(x[:, :5])
    assert built == [(8, cfg.head_dim, cfg.rope_theta), (5, cfg.head_dim, cfg.rope_theta)]
    cos, sin = model.layers["0"].attention.rope.get(8, x.device)
    assert torch.equal(cos, real(8, cfg.head_dim, cfg.rope_theta)[0])
