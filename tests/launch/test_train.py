"""The single-device training launch: exact resume, eval contract, clear errors, safe saves."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.trainer
from engine import checkpoint as ckpt
from engine.data import DataError, open_sources
from engine.optim import lr_at
from models import Llama, ModelConfig, init_weights
from tests.support.launch import SMALL_MODEL, compose, grad_norms, losses, read_metrics, train_in_process


def args(data_dir, run_dir, *extra):
    return [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


PEAK = 1e12  # a made-up device peak (FLOP/s): on a CPU the trainer knows none and logs mfu as null


def test_loss_falls_and_resume_is_exact(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.trainer, "device_peak_flops", lambda device: (PEAK, "test peak"))
    straight = train_in_process(args(data_dir, tmp_path / "a", "train.max_steps=20"))
    train_in_process(args(data_dir, tmp_path / "b", "train.max_steps=20", "train.stop_at=10"))
    resumed = train_in_process(args(data_dir, tmp_path / "b", "train.max_steps=20", "checkpoint.resume=auto"))
    assert [r["step"] for r in resumed] == list(range(11, 21))
    assert losses(read_metrics(tmp_path / "b")) == losses(straight)  # bit-identical, not merely close
    assert grad_norms(read_metrics(tmp_path / "b")) == grad_norms(straight)
    first, last = losses(straight)[0], losses(straight)[-1]
    assert first > math.log(512) - 0.3 and last < first - 0.5
    assert read_metrics(tmp_path / "a") == straight   # what is logged is what was returned

    # the logged values, not merely their keys: lr of the schedule at the step's index, mfu by its
    # formula, and the first step's gradient norm from the serial model on the first batch by hand
    cfg = compose(args(data_dir, tmp_path / "a", "train.max_steps=20"))
    mcfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=512)
    for rec in (r for r in straight if "loss" in r):   # (eval records carry eval_loss only)
        assert rec["lr"] == lr_at(rec["step"] - 1, lr=cfg.optim.lr, warmup_steps=3, max_steps=20,
                                  min_lr_ratio=cfg.optim.min_lr_ratio)
        assert rec["mfu"] == pytest.approx(rec["tokens_per_s"] * mcfg.flops_per_token(32) / PEAK, rel=1e-12)
        assert math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0 and not rec["skipped"]
    x, y = open_sources([str(data_dir)], None, vocab_size=512).train_batch(0, seed=cfg.train.seed, batch_size=8,
                                                                           seq_len=32)
    model = init_weights(Llama(mcfg), seed=cfg.train.seed, n_layers=3)
    model(x, y).backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert straight[0]["loss"] == pytest.approx(model(x, y).item(), rel=1e-6)
    assert straight[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


def test_eval_contract_on_a_hand_made_token_file(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    val = rng.integers(0, 97, size=3 * 5 * 8 + 1 + 3).astype(np.uint16)   # 3 batches of 5 windows, + 3 spare
    val.tofile(d / "val.bin")
    rng.integers(0, 97, size=500).astype(np.uint16).tofile(d / "train.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 97, "train_tokens": 500,
                                             "val_tokens": len(val), "corpus": "hand-made"}))
    shape = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=40",
             "model.vocab_size=97"]
    out = train_in_process([*shape, f"data.dir={d}", f"run_dir={tmp_path / 'r'}", "train.eval_only=true",
                            "train.seq_len=8", "train.global_batch_size=5", "parallel.micro_batch_size=5",
                            "eval.batches=3", "train.seed=7", "checkpoint.load=init"])
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=97)
    model = init_weights(Llama(cfg), seed=7, n_layers=2)
    w = torch.from_numpy(val.astype(np.int64))
    windows = torch.stack([w[i * 8:(i + 1) * 8 + 1] for i in range(15)])  # window i: tokens [8i, 8i+9)
    with torch.no_grad():  # batch b is windows 5b .. 5b+4; eval_loss is the mean over the batches
        expected = sum(model(windows[5 * b:5 * b + 5, :-1], windows[5 * b:5 * b + 5, 1:]).item() for b in range(3)) / 3
    assert out[0]["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert read_metrics(tmp_path / "r")[-1]["eval_loss"] == pytest.approx(expected, rel=1e-6)


def test_config_errors_name_the_key():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError, ValidationError

    with pytest.raises((ConfigKeyError, ConfigCompositionException), match="max_stepz"):
        compose(["train.max_stepz=3"])
    with pytest.raises((ValidationError, ConfigCompositionException), match="max_steps"):
        compose(["train.max_steps=many"])
    with pytest.raises(ConfigCompositionException, match="llama9"):
        compose(["model=llama9"])
    assert compose(["model=llama3_8b"]).model.build().n_layers == 32


def test_batch_not_divisible_by_micro_batch(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by parallel.micro_batch_size=4"):
        train_in_process(args(data_dir, tmp_path, "train.global_batch_size=10", "parallel.micro_batch_size=4"))


def test_missing_or_empty_corpus_and_vocab_mismatch(data_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist; set data.corpus"):
        train_in_process(args(tmp_path / "new", tmp_path / "r", f"data.corpus={tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        train_in_process(args(tmp_path / "new2", tmp_path / "r", f"data.corpus={tmp_path / 'empty'}"))
    with pytest.raises(DataError, match="vocab size 512 but model.vocab_size is 600; set model.vocab_size=512"):
        train_in_process(args(data_dir, tmp_path / "r", "model.vocab_size=600"))


def _one_checkpoint(data_dir, run_dir):
    train_in_process(args(data_dir, run_dir, "train.max_steps=4", "checkpoint.interval=2"))
    return run_dir / "checkpoints"


def test_corrupt_or_truncated_checkpoint_is_refused(data_dir, tmp_path):
    root = _one_checkpoint(data_dir, tmp_path)
    f = root / "step_000004" / "rank_00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    shutil.rmtree(root / "step_000002")  # with an intact older one, resume=auto falls back (test_checkpoint_safety)
    with pytest.raises(ckpt.CheckpointError, match="does not match its checksum"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=6", "checkpoint.resume=auto"))
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=6", f"checkpoint.resume={root / 'step_000004'}"))


def test_failed_save_leaves_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    root = _one_checkpoint(data_dir, tmp_path)
    before = (root / "step_000004" / "manifest.json").read_text()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        train_in_process(args(data_dir, tmp_path, "train.max_steps=6", "checkpoint.interval=6",
                              "checkpoint.resume=auto"))
    assert (root / "latest").read_text().strip() == "step_000004"
    assert (root / "step_000004" / "manifest.json").read_text() == before
    assert ckpt.resolve(root, "auto") == root / "step_000004"
    assert not (root / "step_000006").exists()


def test_load_with_conflicting_model_override(data_dir, tmp_path):
    root = _one_checkpoint(data_dir, tmp_path)
    bad = [a for a in args(data_dir, tmp_path / "x") if not a.startswith("model.n_layers")]
    with pytest.raises(ValueError, match="model.n_layers=4 but the checkpoint has 3"):
        train_in_process([*bad, "model.n_layers=4", f"checkpoint.load={root / 'step_000004'}"])
    out = train_in_process([*[a for a in bad if not a.startswith("model.")], f"checkpoint.load={root / 'step_000004'}",
                            "train.eval_only=true"])
    assert out[0]["eval_loss"] < math.log(512)


def test_checkpoint_from_a_different_model_shape_names_the_tensor(data_dir, tmp_path):
    from models.shard import ShardMeta

    path = _one_checkpoint(data_dir, tmp_path) / "step_000004"
    wq = json.loads((path / "manifest.json").read_text())["tensors"]["model/layers.0.attention.wq.weight"]
    rows, cols = wq["global_shape"]
    wider = ShardMeta.full((rows, cols + 1))          # a model with a different dim
    entry = ckpt.Entry("model/layers.0.attention.wq.weight", torch.empty(rows, cols + 1), wider)
    with pytest.raises(ckpt.CheckpointError, match=rf"tensor 'model/layers.0.attention.wq.weight' has shape "
                                                   rf"\({rows}, {cols}\) in checkpoint .* but \({rows}, {cols + 1}\)"):
        ckpt.load(path, [entry])


def test_checkpoint_slices_that_overlap_and_leave_a_gap_are_refused(data_dir, tmp_path):
    """Slices whose sizes add up to the tensor but overlap (so a region is missing) must not load:
    coverage is checked by geometry, not by counting elements."""
    from models.shard import ShardMeta

    path = _one_checkpoint(data_dir, tmp_path) / "step_000004"
    manifest = json.loads((path / "manifest.json").read_text())
    key = "model/layers.0.attention.wq.weight"
    info = manifest["tensors"][key]
    rows, cols = info["global_shape"]
    (whole,) = info["slices"]
    # rows 0..rows-2 and row 0 again: rows*cols elements in all, but the last row is missing
    info["slices"] = [{**whole, "offset": [0, 0], "shape": [rows - 1, cols]},
                      {**whole, "offset": [0, 0], "shape": [1, cols]}]
    entry = ckpt.Entry(key, torch.empty(rows, cols), ShardMeta.full((rows, cols)))
    with pytest.raises(ckpt.CheckpointError, match=rf"does not fully cover the region of '{key}'"):
        ckpt.load(path, [entry], manifest=manifest)
    info["slices"] = [{**whole, "offset": [0, 0], "shape": [rows - 1, cols]}, whole]   # overlapping, complete
    ckpt.load(path, [entry], manifest=manifest)


def test_torchrun_with_one_process_equals_plain_python(data_dir, tmp_path):
    from tests.support.launch import torchrun

    plain = train_in_process(args(data_dir, tmp_path / "plain", "train.max_steps=3"))
    torchrun(1, args(data_dir, tmp_path / "tr", "train.max_steps=3"))
    assert losses(read_metrics(tmp_path / "tr")) == losses(plain)
    assert grad_norms(read_metrics(tmp_path / "tr")) == grad_norms(plain)
