"""One home per rule: the even layer split, the lowest-holder rule and the checkpoint key scheme
checked against fixed values, every user of a rule agreeing with its home; the manifest read
once on resume; and a module-level import graph without a cycle."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.convert.tandem import stage_layers
from engine.layout import even_split, lowest_holders, stage_bounds
from engine.optim import Optimizer, param_refs
from engine.pipeline import stage_layer_ranges
from tests.support.launch import SMALL_MODEL, train_in_process

ROOT = Path(__file__).resolve().parents[2]


# -- the even layer split -----------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers, n_stages, counts", [
    (10, 3, [4, 3, 3]), (8, 4, [2, 2, 2, 2]), (7, 2, [4, 3]), (5, 5, [1, 1, 1, 1, 1]), (22, 4, [6, 6, 5, 5]),
])
def test_even_split_gives_earlier_stages_the_remainder(n_layers, n_stages, counts):
    assert even_split(n_layers, n_stages) == counts


def test_stage_bounds_are_contiguous_ranges_of_the_counts():
    assert stage_bounds([4, 3, 3]) == [(0, 4), (4, 7), (7, 10)]
    assert stage_bounds([1, 2]) == [(0, 1), (1, 3)]


@pytest.mark.parametrize("n_layers, pp, v", [(10, 3, 1), (7, 2, 1), (8, 2, 2), (12, 3, 2), (4, 4, 1)])
def test_the_trainer_and_the_converter_split_layers_alike(n_layers, pp, v):
    trainer = stage_layer_ranges(n_layers, pp, v)
    converter = stage_layers(n_layers, pp * v)
    assert [(r.start, r.stop) for r in converter] == trainer == stage_bounds(even_split(n_layers, pp * v))


def test_the_split_has_one_definition():
    """The planner, the pipeline stages and the converter import the split; none defines its own."""
    for path in ("engine/planner.py", "engine/pipeline/stages.py", "engine/convert/tandem.py"):
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "even_split" not in defined, path
        assert "divmod(" not in (ROOT / path).read_text(), path


# -- the lowest rank holding a region -----------------------------------------------------------------
def test_lowest_holders_picks_the_lowest_rank_of_each_item():
    held = [["a", "b"], ["b", "c"], ["a", "c", "d"], []]
    assert lowest_holders(held) == {"a": 0, "b": 0, "c": 1, "d": 2}


def test_a_single_process_holds_everything_first():
    """Without a process group every item is this rank's: it writes and counts all of them."""
    assert ckpt.held_lowest([("x", (0,), (2,)), ("y", (0,), (3,))]) == [True, True]
    model = nn.Linear(3, 2)
    refs = param_refs([model])
    assert [r.norm_owner for r in refs] == [True, True]
    entries = [ckpt.Entry(ckpt.model_key(r.name), r.param, r.meta) for r in refs]
    assert ckpt.owned_indices(entries) == [0, 1]


# -- the checkpoint key scheme ------------------------------------------------------------------------
def test_keys_are_built_and_parsed_in_one_place():
    assert ckpt.model_key("layers.0.attention.wq.weight") == "model/layers.0.attention.wq.weight"
    assert ckpt.optim_key("exp_avg", "output.weight") == "optim/exp_avg/output.weight"
    assert ckpt.param_of("model/norm.weight") == "norm.weight"
    assert ckpt.param_of("optim/exp_avg_sq/layers.1.feed_forward.w2.weight") == "layers.1.feed_forward.w2.weight"
    with pytest.raises(ValueError, match="not a checkpoint key"):
        ckpt.param_of("norm.weight")


def test_the_optimizer_names_its_state_by_the_key_scheme():
    class OneRank:  # the mesh fields the optimizer reads
        dp, dp_rank = 1, 0

    model = nn.Linear(3, 2)
    opt = Optimizer(param_refs([model]), OneRank(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    keys = [e.key for e in opt.init_state_entries(step=4)]
    assert keys == ["optim/exp_avg/weight", "optim/exp_avg_sq/weight", "optim/exp_avg/bias", "optim/exp_avg_sq/bias"]
    assert {ckpt.param_of(k) for k in keys} == {"weight", "bias"}
    model(torch.ones(1, 3)).sum().backward()
    opt.step(1e-3)
    assert [e.key for e in opt.state_entries()] == keys


# -- the manifest on resume ---------------------------------------------------------------------------
def test_a_resume_reads_the_manifest_once(data_dir, tmp_path, monkeypatch):
    run = [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={tmp_path}"]
    train_in_process([*run, "train.max_steps=1", "checkpoint.interval=1"])
    reads = []
    real = ckpt.read_manifest
    monkeypatch.setattr(ckpt, "read_manifest", lambda path: reads.append(Path(path).name) or real(path))
    # resume=auto checks the newest checkpoint's files against their checksums (rank 0); the manifest
    # that check reads is the one the trainer then uses
    checks = []
    real_check = ckpt.check_intact
    monkeypatch.setattr(ckpt, "check_intact", lambda path: checks.append(Path(path).name) or real_check(path))
    recs = train_in_process([*run, "train.max_steps=2", "checkpoint.resume=auto", "checkpoint.interval=0"])
    assert [r["step"] for r in recs] == [2]
    assert checks == ["step_000001"]
    # the checksum check, model shape, resume step, data settings and restore share one read
    assert reads.count("step_000001") == 1


# -- arrows -------------------------------------------------------------------------------------------
def _module_imports() -> dict[str, set[str]]:
    """Project module -> the project modules its module-level code imports by name."""
    files = {}
    for pkg in ("engine", "models", "kernels"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.If, ast.Try)):
                continue  # guarded optional imports name no project module
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_module_level_import_cycle():
    graph = _module_imports()
    state: dict[str, int] = {}   # 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "engine.convert.tandem" not in graph["engine.convert.hf"]  # the writer sits below both
