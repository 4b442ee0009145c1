"""scripts/gpu_check.py without a GPU: the no-CUDA path, the report built from canned results, and the
helpers its parts stand on. (The parts themselves need a GPU; ``--dry-run`` runs them on a CPU in minutes,
too slow for this suite.)"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_writes_nothing_and_exits_0(gc, tmp_path, monkeypatch, capsys):
    import torch

    # in this process (a subprocess would spend seconds importing torch again); forced, so a GPU machine agrees
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert gc.main(["--out", str(tmp_path / "report.md")]) == 0
    assert gc.main([]) == 0  # nor the default report path
    assert "no CUDA device is visible" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def _canned(gc):
    facts = gc.Facts(date="2026-12-02 01:00 UTC", gpus=["NVIDIA H200"] * 2, driver="570.86", cuda="12.8",
                     torch="2.13.0+cu128", triton="3.9.0", python="3.11.7", cpu="Xeon (16 cores)")
    kernels = gc.PartResult("kernels", "Kernel tests", 75, seconds=41.2, headline="46 passed",
                            commands=["python -m pytest -q tests/unit/test_kernels.py"], numbers={"passed": "46"})
    train = gc.PartResult("train", "bf16 training", 180, status=gc.FAIL, seconds=97.0,
                          headline="loss curves differ by 5.00e-02 at step 7 | see\nthe table",
                          details="| step | loss, triton | loss, torch | relative difference |",
                          error="Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: ```boom```")
    equiv = gc.PartResult("equivalence", "Equivalence launches", 150, status=gc.SKIP, seconds=0.0,
                          headline="1 GPU visible; these launches need 2")
    return facts, [kernels, train, equiv]


def test_report_shows_machine_summary_and_the_failure(gc):
    facts, results = _canned(gc)
    md = gc.render_report(facts, results, dry_run=False, command="python scripts/gpu_check.py")
    assert md.startswith("# Tandem GPU check, 2026-12-02 01:00 UTC")
    assert "**Overall: FAIL** (1 of 3 parts failed; 138 s in all)" in md
    assert "DRY RUN" not in md
    for row in ("| GPUs | NVIDIA H200 x 2 |", "| driver / CUDA | 570.86 / 12.8 |", "| torch | 2.13.0+cu128 |",
                "| triton | 3.9.0 |",
                "| Kernel tests | PASS | 41 | 75 | 46 passed |",
                "| bf16 training | FAIL | 97 | 180 | loss curves differ by 5.00e-02 at step 7 \\| see the table |",
                "| Equivalence launches | SKIP | 0 | 150 | 1 GPU visible; these launches need 2 |"):
        assert row in md, row
    assert "```bash\npython -m pytest -q tests/unit/test_kernels.py\n```" in md
    assert "- passed: 46" in md
    # the error tail sits in one code block that its own backticks cannot close early
    tail = md.split("Output tail of what failed:")[1]
    assert "```text\nTraceback (most recent call last):" in tail
    assert "RuntimeError: CUDA error: '''boom'''\n```" in tail
    assert gc.exit_status(results) == 1


def test_skipped_parts_do_not_fail_and_dry_runs_are_marked(gc):
    facts, results = _canned(gc)
    ok = [results[0], results[2]]
    md = gc.render_report(facts, ok, dry_run=True, command="python scripts/gpu_check.py --dry-run")
    assert gc.exit_status(ok) == 0
    assert "**Overall: PASS** (0 of 2 parts failed" in md
    assert "**DRY RUN on a CPU**" in md


def test_a_part_that_raises_fails_alone_with_its_traceback(gc, tmp_path, monkeypatch):
    def broken(ck, res):
        res.numbers["before"] = "kept"
        raise KeyError("Action(kind='RB', mb=0, stage=0)")

    monkeypatch.setitem(gc.PARTS, "kernels", ("broken part", broken))
    ck = gc.Check(gc.DRY, tmp_path, 0, 1.0)
    res = gc.run_part(ck, "kernels")
    assert res.status == gc.FAIL and res.numbers == {"before": "kept"}
    assert "KeyError" in res.headline and "Action(kind='RB'" in res.error


def test_command_over_budget_is_stopped_with_its_children(gc, tmp_path):
    # a parent that waits on a child, as torchrun waits on its workers: the whole group goes
    cmd = gc.Command("sleeper", [sys.executable, "-c",
                                 "import subprocess, sys; print('started', flush=True); "
                                 "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"])
    done = gc.run_command(cmd, env=dict(os.environ), timeout=2, log=tmp_path / "sleeper.log")
    assert done.timed_out and done.rc != 0 and done.seconds < 30
    assert "started" in done.output and "time budget ran out" in done.output


def test_a_torchrun_failure_tail_shows_the_worker_error_not_the_launcher_traceback(gc):
    out = "\n".join([
        "step 1 loss 6.3", "Traceback (most recent call last):",
        "ValueError: unknown pipeline schedule 'pipedream'; known schedules: gpipe, 1f1b",
        "E1202 01:53:57.529000 13203 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed "
        "(exitcode: 1) local_rank: 1 (pid: 13236) of binary: python",
        *(f"  launcher traceback line {i}" for i in range(80)),
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "[gpu_check] stopped after 10 s: the part's time budget ran out"])
    tail = gc.Completed(1, 1.0, True, out).tail(lines=4)
    assert tail.splitlines() == [
        "Traceback (most recent call last):",
        "ValueError: unknown pipeline schedule 'pipedream'; known schedules: gpipe, 1f1b",
        out.splitlines()[3],
        "[gpu_check] stopped after 10 s: the part's time budget ran out"]
    assert gc.Completed(1, 1.0, False, "a\nb\nc").tail(lines=2) == "b\nc"  # no torchrun: the plain tail


def test_pytest_counts_read_the_closing_line_only(gc):
    out = "..F.\n    assert '3 passed' in log\nE   AssertionError\n= 1 failed, 44 passed, 2 skipped in 61.20s ="
    assert gc.pytest_counts(out) == {"failed": 1, "passed": 44, "skipped": 2}
    assert gc.pytest_counts("ImportError while loading conftest") == {}


def test_bench_summary_reads_the_table_and_the_verdicts(gc):
    out = "\n".join([
        "device: NVIDIA H200; torch 2.13.0; dtype bfloat16; measured copy bandwidth 4100 GB/s", "",
        "| op | shape | impl | fwd+bwd ms |", "|---|---|---|---:|", "| rms_norm | 8192x4096 | triton | 0.110 |",
        "  File \"x.py\", line 3: a warning's traceback is not a verdict",
        "", "goals (>= 85% of copy bandwidth, no slower than torch.compile, cross-entropy peak <= 1/4 eager):",
        "  rms_norm 8192x4096: 91% of copy BW (ok), no slower than torch.compile",
        "  swiglu 8192x14336: 80% of copy BW (BELOW 85%), no slower than torch.compile"])
    device, table, verdicts = gc.bench_summary(out)
    assert device.startswith("NVIDIA H200;") and len(table) == 3
    assert verdicts == ["rms_norm 8192x4096: 91% of copy BW (ok), no slower than torch.compile",
                        "swiglu 8192x14336: 80% of copy BW (BELOW 85%), no slower than torch.compile"]


def test_max_rel_diff(gc):
    assert gc.max_rel_diff([1.0, 2.2, 3.0], [1.0, 2.0, 3.0]) == (pytest.approx(0.1), 2)
    assert gc.max_rel_diff([1.0], [1.0, 2.0])[0] == float("inf")  # a launch that stopped early never matches
    assert gc.max_rel_diff([], [])[0] == float("inf")


def test_command_shell_shows_env_and_plain_python(gc):
    cmd = gc.train_command("t", ["kernels=triton", "parallel.layers_per_stage=[3,1]"], nproc=2, gpus=["2", "3"],
                           interpret=True)
    assert cmd.shell() == ("CUDA_VISIBLE_DEVICES=2,3 TRITON_INTERPRET=1 python -m torch.distributed.run --nnodes 1 "
                           "--nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 scripts/train.py "
                           "kernels=triton 'parallel.layers_per_stage=[3,1]'")


def test_real_runs_never_inherit_the_interpreter(gc, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in gc.base_env(dry_run=False)
    assert gc.base_env(dry_run=True)["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_groups_follow_an_inherited_cuda_visible_devices(gc, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    ck = gc.Check(gc.REAL, tmp_path, 5, 1.0)
    assert ck.gpu_groups(2) == [["4", "5"], ["6", "7"]]


def test_synthetic_data_is_a_prepared_directory_of_the_asked_vocabulary(gc, tmp_path):
    from engine.data import TokenData, open_sources

    d = gc.write_synthetic_data(tmp_path / "d", vocab_size=70_000, n_tokens=50_000)
    data = TokenData(d, vocab_size=70_000)
    assert data.meta["dtype"] == "uint32" and len(data.train) + len(data.val) == 50_000
    x, y = open_sources([str(d)], None, vocab_size=70_000).train_batch(0, seed=1, batch_size=4, seq_len=64)
    assert x.shape == (4, 64) and int(x.max()) < 70_000 and (x[:, 1:] == y[:, :-1]).all()
    # learnable: far fewer distinct tokens than the vocabulary (a Zipf law over phrases), so loss can fall
    assert len(set(data.train.read(0, len(data.train)).tolist())) < 20_000
