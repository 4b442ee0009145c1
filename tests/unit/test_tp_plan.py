"""The tensor-parallel plan: the trainer and the checkpoint converter derive the same slices from it.

No processes: `parallelize` builds the real parallel chunks on the meta device for every tp rank
of a mesh-like object (the plan hands each layer its shard, so no process group is asked), and
every parameter's `ShardMeta` is compared with the region the converter's `reshard` writes for
that rank. The regions of all ranks must also tile each global tensor, with replicas identical.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.checkpoint import CheckpointError, read_manifest
from engine.convert.tandem import Region, reshard, stage_layers, tp_region, write_tandem
from engine.pipeline.stages import stage_layer_ranges
from engine.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral
from engine.tensor_parallel import GradSync, param_shard, parallelize
from models import Llama, ModelConfig
from models.shard import iter_params

BASE = dict(dim=48, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=131, max_seq_len=32)

# (name, model config, tp, pp chunks): tp dividing n_kv_heads and tp a multiple of it, tied and
# untied embeddings, vocabularies needing padding (5 over 4 ranks leaves the last shard empty),
# one chunk and several pipeline chunks
LAYOUTS = [
    ("tp2-gqa-untied", dict(BASE), 2, 1),
    ("tp2-tied-pp2", dict(BASE, tie_embeddings=True), 2, 2),
    ("tp3-kv1-pp3", dict(BASE, n_heads=6, n_kv_heads=1, ffn_dim=81, n_layers=3), 3, 3),
    ("tp4-kv-replica-tied-pp2", dict(BASE, n_heads=8, tie_embeddings=True), 4, 2),
    ("tp4-empty-vocab-shard-pp4", dict(BASE, n_heads=8, vocab_size=5), 4, 4),
]


def _chunks(cfg: ModelConfig, tp: int, rank: int, pp: int, sequence_parallel: bool) -> list[Llama]:
    """The trainer's chunks for tp rank ``rank``, parallelized on the meta device."""
    mesh = SimpleNamespace(tp=tp, tp_rank=rank, tp_group=None)
    chunks = []
    for layers in stage_layer_ranges(cfg.n_layers, pp):
        with torch.device("meta"):
            chunk = Llama(cfg, layers=layers)
        chunks.append(parallelize(chunk, mesh, sequence_parallel=sequence_parallel))
    return chunks


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("name, kw, tp, pp", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_trainer_and_converter_derive_the_same_slices(name, kw, tp, pp, sequence_parallel):
    cfg = ModelConfig(**kw)
    with torch.device("meta"):
        serial = {n: tuple(p.shape) for n, p in Llama(cfg).named_parameters()}
    # the converter splits the layers over the pipeline chunks as the trainer does
    assert [(r.start, r.stop) for r in stage_layers(cfg.n_layers, pp)] == stage_layer_ranges(cfg.n_layers, pp)
    regions: dict[str, list] = {n: [] for n in serial}
    for rank in range(tp):
        seen = set()
        for chunk in _chunks(cfg, tp, rank, pp, sequence_parallel):
            # the entry mapping sits once on each attention and MLP, and on the last chunk's final norm
            entered = {path for path, m in chunk.named_modules() if m._forward_pre_hooks}
            assert entered == {f"layers.{i}.{part}" for i in range(*chunk.layer_range)
                               for part in ("attention", "feed_forward")}
            assert not chunk.is_last or len(chunk.norm._forward_hooks) == 1
            for n, p, meta in iter_params(chunk):
                seen.add(n)
                assert meta.global_shape == serial[n], n
                box = tp_region(n, meta.global_shape, cfg, tp, rank)
                assert box == (None if meta.is_full else (meta.offset, meta.shape)), (n, rank)
                shard = param_shard(n, meta.global_shape, cfg, tp, rank, sequence_parallel=sequence_parallel)
                assert shard.meta == meta and tuple(p.shape) == shard.local_shape, (n, rank)
                assert shard.grad_sync == _expected_sync(n, cfg, tp, sequence_parallel), (n, rank)
                regions[n].append(meta)
        assert seen == set(serial)  # every global parameter lives on some chunk of every tp rank
    for n, metas in regions.items():
        _assert_tiles(n, serial[n], metas)


def _expected_sync(name: str, cfg: ModelConfig, tp: int, sequence_parallel: bool):
    if name.endswith("norm.weight"):
        return GradSync.PARTIAL if sequence_parallel else None
    if name.endswith(("attention.wk.weight", "attention.wv.weight")) and cfg.n_kv_heads % tp:
        return GradSync.KV_REPLICA
    return None


def _assert_tiles(name: str, shape: tuple[int, ...], metas) -> None:
    """The regions cover ``shape`` exactly; a region held by several ranks is held identically."""
    count = torch.zeros(shape, dtype=torch.int64)
    for m in set(metas):
        count[m.global_slices()] += 1
    assert bool((count == 1).all()), f"{name}: the tp ranks' regions do not tile the global tensor"


def test_the_plan_on_fixed_values():
    """What the rules give, written out: KV heads shared by rank pairs, vocabulary padding."""
    cfg = ModelConfig(**dict(BASE, n_heads=8, vocab_size=5))  # head_dim 6, 2 KV heads over tp=4
    kv = [param_shard("layers.0.attention.wk.weight", (12, 48), cfg, 4, r) for r in range(4)]
    assert [(s.meta.offset, s.meta.shape) for s in kv] == [((0, 0), (6, 48))] * 2 + [((6, 0), (6, 48))] * 2
    assert all(s.grad_sync is GradSync.KV_REPLICA for s in kv)
    emb = [param_shard("tok_embeddings.weight", (5, 48), cfg, 4, r) for r in range(4)]
    assert [(s.meta.offset[0], s.meta.shape[0], s.local_shape[0]) for s in emb] == [(0, 2, 2), (2, 2, 2), (4, 1, 2),
                                                                                     (5, 0, 2)]
    wo = param_shard("layers.3.attention.wo.weight", (48, 48), cfg, 4, 1)
    assert (wo.meta.offset, wo.meta.shape, wo.local_shape) == ((0, 12), (48, 12), (48, 12))
    norm = param_shard("layers.3.ffn_norm.weight", (48,), cfg, 4, 2, sequence_parallel=True)
    assert norm.meta.is_full and norm.grad_sync is GradSync.PARTIAL


def _consolidated(path, cfg: ModelConfig):
    """A one-file checkpoint of ``cfg``'s model (zeros), as the converter's input."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Llama(cfg).named_parameters()}
    path.mkdir()
    regions = [Region.full(f"model/{n}", s, torch.float32) for n, s in shapes.items()]
    write_tandem(path, {"consolidated_00000.safetensors": regions}, lambda r: torch.zeros(r.shape),
                 model_config=cfg.to_dict(), layout={"tp": 1, "pp": 1, "dp": 1}, train_state={"step": 0}, step=0)


@pytest.mark.parametrize("name, kw, tp, pp", [LAYOUTS[3], LAYOUTS[4]], ids=[LAYOUTS[3][0], LAYOUTS[4][0]])
def test_reshard_writes_each_rank_the_slices_its_chunks_hold(name, kw, tp, pp, tmp_path):
    """Every region of every tp rank's chunks is in the file of the lowest (pp rank, tp rank) holding
    it, and the files hold nothing else."""
    cfg = ModelConfig(**kw)
    _consolidated(tmp_path / "one", cfg)
    reshard(tmp_path / "one", tmp_path / "re", tp=tp, pp=pp)
    written = {(key[len("model/"):], tuple(s["offset"]), tuple(s["shape"]), s["file"])
               for key, info in read_manifest(tmp_path / "re")["tensors"].items() for s in info["slices"]}
    holders: dict[tuple, tuple[int, int]] = {}
    for rank in range(tp):
        for stage, chunk in enumerate(_chunks(cfg, tp, rank, pp, sequence_parallel=False)):
            for n, _, meta in iter_params(chunk):
                if 0 not in meta.shape:
                    region = (n, meta.offset, meta.shape)
                    holders[region] = min(holders.get(region, (stage, rank)), (stage, rank))
    expected = {(*region, f"pp{stage:02d}_tp{rank:02d}.safetensors") for region, (stage, rank) in holders.items()}
    assert written == expected


def test_a_shape_the_plan_cannot_split_is_refused_by_parallelize_and_the_converter(tmp_path):
    cfg = ModelConfig(**dict(BASE, n_heads=12, n_kv_heads=2))  # tp=3 neither divides 2 nor is a multiple
    with torch.device("meta"):
        model = Llama(cfg)
    with pytest.raises(ValueError, match=r"neither divides model.n_kv_heads=2"):
        parallelize(model, SimpleNamespace(tp=3, tp_rank=0, tp_group=None))
    with pytest.raises(ValueError, match=r"parallel.tp=4 does not divide model.n_heads=6"):
        param_shard("layers.0.attention.wq.weight", (48, 48), ModelConfig(**BASE), 4, 0)
    _consolidated(tmp_path / "one", cfg)
    with pytest.raises(CheckpointError, match=r"neither divides model.n_kv_heads=2"):
        reshard(tmp_path / "one", tmp_path / "re", tp=3, pp=1)


def test_parallelize_refuses_a_model_whose_weight_gradients_are_already_deferred():
    """The layers parallelize builds would not carry the store, so deferral silently stopped."""
    cfg = ModelConfig(**BASE)
    with torch.device("meta"):
        model = Llama(cfg)
    enable_weight_grad_deferral([model], WeightGradStore())
    with pytest.raises(ValueError, match="call parallelize before enable_weight_grad_deferral"):
        parallelize(model, SimpleNamespace(tp=2, tp_rank=0, tp_group=None))
