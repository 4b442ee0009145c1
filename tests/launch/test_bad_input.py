"""Bad input gets a clear error: every row runs the entry point's function in this process and asserts
exit code 2 and the key named on the `error:` line; a few rows run the real scripts as subprocesses
to check the formatting (no traceback) and that nothing is left behind in the working directory."""
import subprocess
import sys

import pytest

from engine.cli import run_cli
from tests.support.launch import ROOT, SMALL_MODEL, train_in_process


def compose_raw(overrides):
    """The DictConfig a @hydra.main entry point receives."""
    from hydra import compose, initialize_config_dir

    from engine.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def run_with_checkpoint(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt_run")
    train_in_process([*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run}", "train.max_steps=4", "train.stop_at=2"])
    return run


# (id, overrides — {data}, {tmp}, {run} expand —, text the error must contain)
TRAIN_ROWS = [
    ("keep_last<0", ["checkpoint.keep_last=-1"], "checkpoint.keep_last=-1"),
    ("plus-unknown", ["+train.max_stepz=3"], "train.max_stepz"),
    ("log_interval=0", ["train.log_interval=0"], "train.log_interval=0"),
    ("eval.batches=0", ["eval.batches=0"], "eval.batches=0"),
    ("schedule", ["parallel.schedule=2f2b"], "parallel.schedule='2f2b'"),
    ("layers_per_stage@pp1", ["parallel.layers_per_stage=[1,2]"], "parallel.layers_per_stage"),
    ("max_steps=0", ["train.max_steps=0"], "train.max_steps=0"),
    ("interval<0", ["checkpoint.interval=-3"], "checkpoint.interval=-3"),
    ("stop_at<0", ["train.stop_at=-1"], "train.stop_at=-1"),
    ("resume+load", ["checkpoint.resume=auto", "checkpoint.load={tmp}"], "checkpoint.load="),
    ("lr<0", ["optim.lr=-0.1"], "optim.lr=-0.1"),
    ("zero=3", ["optim.zero=3"], "optim.zero=3 is not one of 0, 1, 2"),
    ("timeout_s=0", ["parallel.timeout_s=0"], "parallel.timeout_s=0"),
    ("unwritable run_dir", ["run_dir={tmp}/a_file/run"], "run_dir="),
    ("data.dir is a file", ["data.dir={tmp}/a_file"], "data.dir="),
    ("eval_only, no checkpoint", ["train.eval_only=true"], "train.eval_only=true"),
    ("batch % micro", ["train.global_batch_size=10", "parallel.micro_batch_size=4"], "train.global_batch_size=10"),
    ("fresh start over checkpoints", ["run_dir={run}"], "checkpoint.overwrite=true"),
    ("resume at max_steps", ["run_dir={run}", "checkpoint.resume=auto", "train.max_steps=2"], "train.max_steps=2"),
    ("preset vs checkpoint", ["run_dir={run}", "checkpoint.resume=auto", "model=llama3_1b"], "model=llama3_1b"),
    ("changed seed", ["run_dir={run}", "checkpoint.resume=auto", "train.seed=5"], "train.seed=5"),
]


@pytest.mark.parametrize("overrides, named", [r[1:] for r in TRAIN_ROWS], ids=[r[0] for r in TRAIN_ROWS])
def test_train_refuses_naming_the_key(data_dir, tmp_path, run_with_checkpoint, capfd, overrides, named):
    (tmp_path / "a_file").write_text("not a directory")
    fill = {"data": data_dir, "tmp": tmp_path, "run": run_with_checkpoint}
    extra = [o.format(**fill) for o in overrides]
    if any(o.startswith("model=") for o in extra):
        base = [a for a in SMALL_MODEL if not a.startswith("model.")]
    else:
        base = SMALL_MODEL
    fresh = tmp_path / "new" / "run"
    before = sorted(p.name for p in run_with_checkpoint.rglob("*"))
    code = run_cli(train_in_process, [*base, f"data.dir={data_dir}", f"run_dir={fresh}", *extra])
    err = capfd.readouterr().err
    assert code == 2, err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert named in line, line
    assert not (tmp_path / "new").exists()  # a failed launch leaves no empty directory
    assert sorted(p.name for p in run_with_checkpoint.rglob("*")) == before  # nor touches an existing run


PLAN_ROWS = [
    ("unknown schedule", ["planner.schedules=[1f1b,zz]"], "planner.schedules"),
    ("negative batch", ["train.global_batch_size=-8"], "train.global_batch_size=-8"),
    ("seq_len=0", ["train.seq_len=0"], "train.seq_len=0"),
    ("unwritable out", ["planner.out={tmp}/a_file/plan/x.yaml"], "planner.out="),
]


@pytest.mark.parametrize("overrides, named", [r[1:] for r in PLAN_ROWS], ids=[r[0] for r in PLAN_ROWS])
def test_plan_stages_refuses_naming_the_key(tmp_path, capfd, overrides, named):
    from scripts.plan_stages import plan_stages

    (tmp_path / "a_file").write_text("not a directory")
    code = run_cli(plan_stages, compose_raw(["parallel.pp=2", *[o.format(tmp=tmp_path) for o in overrides]]))
    err = capfd.readouterr().err
    assert code == 2 and named in err, err


def test_prepare_data_refuses_to_replace_a_prepared_dir(data_dir, capfd):
    from scripts.prepare_data import prepare

    before = (data_dir / "meta.json").read_text()
    code = run_cli(prepare, compose_raw([f"data.dir={data_dir}", "model.vocab_size=600"]), False)
    err = capfd.readouterr().err
    assert code == 2 and "data.force=true" in err, err
    assert (data_dir / "meta.json").read_text() == before


@pytest.mark.parametrize("argv, named", [
    (["to-hf", "{ckpt}", "{tmp}/hf", "--max-shard-size", "0"], "--max-shard-size 0"),
    (["to-hf", "{ckpt}", "{tmp}/a_file/hf"], "dst="),
    (["reshard", "{ckpt}", "{tmp}/r", "--tp", "0", "--pp", "1"], "--tp 0"),
], ids=["max-shard-size 0", "unwritable dst", "tp 0"])
def test_convert_checkpoint_refuses_naming_the_argument(run_with_checkpoint, tmp_path, capfd, argv, named):
    from scripts.convert_checkpoint import main

    (tmp_path / "a_file").write_text("not a directory")
    ckpt = run_with_checkpoint / "checkpoints" / "step_000002"
    code = main([a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    err = capfd.readouterr().err
    assert code == 2 and named in err, err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("script, extra, named", [
    ("train.py", ["train.log_interval=0"], "train.log_interval=0"),
    ("train.py", ["+train.max_stepz=3"], "train.max_stepz"),
    ("prepare_data.py", [], "data.force=true"),
    ("plan_stages.py", ["planner.schedules=[zz]"], "planner.schedules"),
], ids=["train", "train-plus", "prepare_data", "plan_stages"])
def test_scripts_print_one_error_line_exit_2_and_leave_nothing_behind(data_dir, tmp_path, script, extra, named):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), f"data.dir={data_dir}",
                           f"model.vocab_size=512", *extra], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(cwd.iterdir()) == []  # no runs/<model>/, no outputs/


def _damage(kind, d):
    """Damage a copy of a prepared data directory the way a user's disk or hands do."""
    import json

    meta = json.loads((d / "meta.json").read_text())
    shard = d / meta["splits"]["train"]["shards"][0]["file"]
    if kind == "missing token file":
        shard.unlink()
    elif kind == "token file of odd size":
        with open(shard, "ab") as f:
            f.write(b"\0")
    elif kind == "invalid meta.json":
        (d / "meta.json").write_text("{not json")
    elif kind == "ids >= vocab":
        meta["splits"]["train"]["max_id"] = meta["vocab_size"] + 7
        (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["missing token file", "token file of odd size", "invalid meta.json", "ids >= vocab"])
def test_a_damaged_data_dir_is_refused_before_step_1(data_dir, tmp_path, capfd, kind):
    import shutil

    damaged = tmp_path / "data"
    shutil.copytree(data_dir, damaged)
    _damage(kind, damaged)
    code = run_cli(train_in_process, [*SMALL_MODEL, f"data.dir={damaged}", f"run_dir={tmp_path / 'run'}"])
    err = capfd.readouterr().err
    line = next((ln for ln in err.splitlines() if ln.startswith("error: ")), err)
    assert code == 2 and str(damaged) in line and "prepare" in line, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_binary_corpus_is_a_clear_error(tmp_path, capfd):
    from scripts.prepare_data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blob.txt").write_bytes(bytes(range(256)) * 64)
    code = run_cli(prepare, compose_raw([f"data.corpus={corpus}", f"data.dir={tmp_path / 'out'}",
                                         "model.vocab_size=512"]), False)
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("error: ") and "data." in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_to_hf_with_a_tokenizer_that_is_not_one(run_with_checkpoint, tmp_path, capfd):
    from scripts.convert_checkpoint import main

    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"this is not a SentencePiece model")
    code = main(["to-hf", str(run_with_checkpoint / "checkpoints" / "step_000002"), str(tmp_path / "hf"),
                 "--tokenizer", str(bogus)])
    err = capfd.readouterr().err
    assert code == 2 and "--tokenizer" in err and str(bogus) in err, err[-2000:]
    assert not (tmp_path / "hf").exists()


def test_a_data_error_stops_every_rank_at_launch_alike(data_dir, tmp_path):
    """Each rank reads only its dp slice (and a middle pipeline stage nothing), so a data error found
    while reading would stop some ranks and leave the others waiting in a collective. Both data errors
    are found at launch instead, on every rank, with the same message: a val split too small for the
    evaluation (dp2 and pp2) and an id past the vocabulary in data without a recorded max_id (one
    spot in the train split, a window at most one rank reads)."""
    from tests.support.data_dirs import flat_format_copy
    from tests.support.distributed import run_distributed
    from tests.support.trainer_world import run_trainers_reporting_errors

    bad_ids = flat_format_copy(data_dir, tmp_path / "flat", train_ids={1000: 600})
    base = [*SMALL_MODEL, "train.max_steps=1"]
    runs = {"eval dp2": [*base, f"data.dir={data_dir}", f"run_dir={tmp_path / 'a'}", "eval.interval=1",
                         "eval.batches=1000"],
            "eval pp2": [*base, f"data.dir={data_dir}", f"run_dir={tmp_path / 'b'}", "parallel.pp=2",
                         "eval.interval=1", "eval.batches=1000"],
            "ids dp2": [*base, f"data.dir={bad_ids}", f"run_dir={tmp_path / 'c'}"]}
    ranks = run_distributed(run_trainers_reporting_errors, world_size=2, args=(runs,), timeout=120)
    assert ranks[0] == ranks[1], ranks
    assert ranks[0]["eval dp2"].startswith("DataError: the val split") and "lower eval.batches" in ranks[0]["eval dp2"]
    assert ranks[0]["eval pp2"] == ranks[0]["eval dp2"]
    assert ranks[0]["ids dp2"].startswith("DataError: ") and "token id 600 is not below the vocabulary size 512" \
        in ranks[0]["ids dp2"], ranks
    assert not any((tmp_path / r).exists() for r in "abc")
