"""optim.zero=2 (engine/zero.py) against the serial model: dp2, pp2×dp2 (tied embeddings) and
tp2×dp2 (sequence parallel) over 10 steps, with the loss and gradient norm of every step and every
weight and AdamW moment of the final checkpoint within fp32 tolerance; checkpoints moved between
zero=0/1/2 and dp=2/1 continue the serial run; rank 0's launch memory report equals the bytes of
the tensors every rank really holds; with bf16 parameters the fp32 master starts from the fp32
initialization. The bucket layout of pp2 × tp2 with tied embeddings and sequence parallelism is
checked without a process group: both copies of the embedding cut alike. The model is small and odd
(3 layers over 2 stages, GQA)."""
import re

import pytest
import torch

from engine import checkpoint as ckpt
from engine.convert.tandem import verify
from models.shard import ShardMeta
from tests.support.distributed import run_distributed
from tests.support.launch import SMALL_MODEL, assert_runs_match, train_in_process
from tests.support.zero_world import run_measured

STEPS = 10
TIED = ["model.tie_embeddings=true"]


def _base(data_dir, run_dir, *extra):
    steps = [] if any(e.startswith("train.max_steps=") for e in extra) else [f"train.max_steps={STEPS}"]
    return [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run_dir}", *steps, *extra]


@pytest.fixture(scope="module")
def serial(data_dir, tmp_path_factory):
    """Serial runs (untied and tied) with their final checkpoint."""
    out = {}
    for name, model in (("untied", []), ("tied", TIED)):
        run = tmp_path_factory.mktemp(f"serial_{name}")
        out[name] = (train_in_process(_base(data_dir, run, *model, f"checkpoint.interval={STEPS}")),
                     run / "checkpoints" / f"step_{STEPS:06d}")
    return out


def _final(run) -> "Path":
    return run / "checkpoints" / f"step_{STEPS:06d}"


def read_full(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint at its global shape (whatever layout wrote it)."""
    manifest = ckpt.read_manifest(path)
    full = {k: torch.empty(info["global_shape"], dtype=getattr(torch, info["dtype"]))
            for k, info in manifest["tensors"].items()}
    ckpt.load(path, [ckpt.Entry(k, t, ShardMeta.full(t.shape)) for k, t in full.items()], manifest=manifest)
    return full


def assert_checkpoints_match(path, reference, rel: float = 1e-4):
    """Every weight and AdamW moment of the checkpoint at ``path`` against ``reference``'s, each
    within ``rel`` of the tensor's largest value. Measured for tp2 × dp2 after 10 steps: 6.6e-6 on
    weights of up to 1.0, 1.8e-8 on first moments, 7e-10 on second moments (tp's other summation
    order, amplified by Adam); a misplaced slice, a missing sum or an unaveraged gradient moves a
    tensor by a good fraction of its size."""
    verify(path)   # every checksum, and every global tensor covered exactly once by the saved boxes
    got, want = read_full(path), read_full(reference)
    assert sorted(got) == sorted(want)
    for k in want:
        diff, scale = (got[k] - want[k]).abs().max().item(), want[k].abs().max().item()
        assert diff <= rel * scale, f"{k}: differs by {diff:.3g}, more than {rel} × its largest value {scale:.3g}"


def parse_report(text: str) -> dict[int, dict[str, int]]:
    """rank -> numbers, from the launch report's lines ``  rank 0 (...), rank 1 (...): parameters=N ...``."""
    out = {}
    for line in text.splitlines():
        if line.startswith("  rank "):
            ranks, fields = line.split(": ", 1)
            numbers = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
            for r in re.findall(r"rank (\d+) \(", ranks):
                out[int(r)] = numbers
    return out


def assert_report_is_real(result: list[dict], name: str):
    """The numbers rank 0 printed at launch, per rank, equal the bytes that rank's tensors hold."""
    printed = parse_report(result[0][name]["printed"])
    assert sorted(printed) == list(range(len(result))), result[0][name]["printed"]
    for rank, by_run in enumerate(result):
        assert printed[rank] == by_run[name]["held"], (name, rank, printed[rank], by_run[name]["held"])


# -- four ranks: pp2×dp2 with tied embeddings, tp2×dp2 with sequence parallelism ----------------
FOUR = {"pp2_dp2_tied": ["parallel.pp=2", "parallel.dp=2", *TIED],
        # ZB-V on 3 layers: four chunks, the last head-only, so rank 0 holds the embedding and the head
        # (both tied copies); its deferred W's start their reduce-scatters as they run
        "pp2_dp2_zbv_tied": ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2",
                             "parallel.layers_per_stage=[1,1,1,0]", *TIED],
        # DualPipeV needs 2·pp micro-batches per dp rank: micro-batches of 1 give 4 of the same global batch
        "pp2_dp2_dualpipev": ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=dualpipev",
                              "parallel.virtual_stages=2", "parallel.layers_per_stage=[1,1,1,0]",
                              "parallel.micro_batch_size=1"],
        "tp2_dp2_sp": ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"],
        "tp2_dp2_bf16": ["parallel.tp=2", "parallel.dp=2", "precision=bf16", "train.stop_at=3"]}


@pytest.fixture(scope="module")
def four(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2_four")
    runs = {name: _base(data_dir, root / name, "optim.zero=2", f"checkpoint.interval={STEPS}", *extra)
            for name, extra in FOUR.items()}
    return root, run_distributed(run_measured, 4, (runs,))


@pytest.mark.parametrize("name, model", [("pp2_dp2_tied", "tied"), ("pp2_dp2_zbv_tied", "tied"),
                                         ("pp2_dp2_dualpipev", "untied"), ("tp2_dp2_sp", "untied")])
def test_four_rank_layouts_match_serial(four, serial, name, model):
    root, result = four
    records, reference = serial[model]
    assert_runs_match(result[0][name]["records"], records)
    assert_checkpoints_match(_final(root / name), reference)
    assert_report_is_real(result, name)
    assert all(by_run[name]["overlapped"] > 0 for by_run in result)   # reduce-scatters sent during backward


def test_bf16_parameters_keep_their_fp32_master_in_the_optimizer_slices(four, serial):
    """precision=bf16 under zero=2: bf16 parameters and gradients in the model, fp32 master weights
    and fp32 gradients only in each rank's slice (the report's numbers, real tensors), the master
    taken from the fp32 initialization (not from its bf16 cast), saved as the fp32 weights; the loss
    stays within bf16's 1e-3 of the fp32 serial run."""
    root, result = four
    losses = [r["loss"] for r in result[0]["tp2_dp2_bf16"]["records"] if "loss" in r]
    reference = [r["loss"] for r in serial["untied"][0][:3]]
    assert len(losses) == 3 and all(abs(a - b) <= 1e-3 * b for a, b in zip(losses, reference)), (losses, reference)
    verify(root / "tp2_dp2_bf16" / "checkpoints" / "step_000003")
    manifest = ckpt.read_manifest(root / "tp2_dp2_bf16" / "checkpoints" / "step_000003")
    assert {t["dtype"] for k, t in manifest["tensors"].items() if k.startswith("model/")} == {"float32"}
    for by_run in result:
        run = by_run["tp2_dp2_bf16"]
        assert run["param_dtypes"] == ["torch.bfloat16"]
        assert run["master_init_diff"] == 0.0
        held = run["held"]
        # the fp32 master slice: 4 bytes for 1/dp of the 2-byte parameters, so at dp=2 as many bytes;
        # the gradients: the bf16 buckets and the persistent fp32 copy of the slice, twice that
        assert held["master_weights"] == held["parameters"]
        assert held["gradients"] == 2 * held["parameters"]
    assert_report_is_real(result, "tp2_dp2_bf16")


# -- two ranks: dp2, and checkpoints moved between ZeRO modes -----------------------------------
@pytest.fixture(scope="module")
def two(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2_two")
    half = f"step_{STEPS // 2:06d}"
    runs = {
        "dp2_zero2": _base(data_dir, root / "dp2_zero2", "parallel.dp=2", "optim.zero=2",
                           f"checkpoint.interval={STEPS // 2}"),
        # a zero=2 checkpoint resumed at zero=1 ...
        "zero1_from_zero2": _base(data_dir, root / "zero1_from_zero2", "parallel.dp=2", "optim.zero=1",
                                  f"checkpoint.resume={root / 'dp2_zero2' / 'checkpoints' / half}"),
        # ... and a zero=0 checkpoint resumed at zero=2
        "zero0_stop": _base(data_dir, root / "zero0_stop", "parallel.dp=2", "optim.zero=0", f"train.stop_at={STEPS // 2}"),
        "zero2_from_zero0": _base(data_dir, root / "zero2_from_zero0", "parallel.dp=2", "optim.zero=2",
                                  f"checkpoint.interval={STEPS}",
                                  f"checkpoint.resume={root / 'zero0_stop' / 'checkpoints' / half}"),
    }
    return root, run_distributed(run_measured, 2, (runs,))


def test_dp2_matches_serial_and_reports_its_memory(two, serial):
    root, result = two
    records, reference = serial["untied"]
    assert_runs_match(result[0]["dp2_zero2"]["records"], records)
    assert_checkpoints_match(_final(root / "dp2_zero2"), reference)
    assert_report_is_real(result, "dp2_zero2")
    assert all(by_run["dp2_zero2"]["overlapped"] >= STEPS for by_run in result)   # every step's bucket during backward
    assert_report_is_real(result, "zero1_from_zero2")
    # each rank writes its own slice of the moments: the state is spread over both files
    manifest = ckpt.read_manifest(_final(root / "dp2_zero2"))
    writers = {re.match(r"rank_(\d+)", s["file"]).group(1) for k, t in manifest["tensors"].items()
               if k.startswith("optim/") for s in t["slices"]}
    assert writers == {"00000", "00001"}


def test_checkpoints_move_between_zero_modes_and_dp(two, serial, data_dir, tmp_path, capfd):
    """zero=2 → zero=1 and zero=0 → zero=2 at dp2, and zero=2 at dp2 → dp=1 (where optim.zero=2 is
    a stated no-op): each continues the serial run's last five steps."""
    root, result = two
    records, reference = serial["untied"]
    assert_runs_match(result[0]["zero1_from_zero2"]["records"], records[STEPS // 2:])
    assert_runs_match(result[0]["zero2_from_zero0"]["records"], records[STEPS // 2:])
    assert_checkpoints_match(_final(root / "zero2_from_zero0"), reference)
    capfd.readouterr()
    half = root / "dp2_zero2" / "checkpoints" / f"step_{STEPS // 2:06d}"
    at_dp1 = train_in_process(_base(data_dir, tmp_path, "optim.zero=2", f"checkpoint.resume={half}"))
    assert_runs_match(at_dp1, records[STEPS // 2:])
    assert "optim.zero=2 (dp=1: runs as zero=0)" in capfd.readouterr().out


# -- pieces of the checkpoint layout, by hand ---------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (5, 3), (3, 4, 5), (1, 9)])
def test_a_flat_range_is_a_few_boxes_in_order(shape):
    """Every flat range of a row-major tensor: its boxes hold exactly those elements, in order, and
    at most 2 × ndim - 1 of them."""
    from engine.zero import flat_boxes

    numel = int(torch.Size(shape).numel())
    t = torch.arange(numel).view(shape)
    for lo in range(numel):
        for hi in range(lo + 1, numel + 1):
            boxes = flat_boxes(shape, lo, hi)
            assert len(boxes) <= 2 * len(shape) - 1
            got = []
            for off, ext, f in boxes:
                block = t[tuple(slice(o, o + e) for o, e in zip(off, ext))].reshape(-1)
                assert block.tolist() == list(range(f, f + block.numel()))
                got += block.tolist()
            assert got == list(range(lo, hi)), (shape, lo, hi, boxes)


def test_tied_embedding_copies_are_cut_alike_on_both_stages():
    """pp2 × tp2 with sequence parallelism and tied embeddings, dp 2 and 3: the late buckets hold
    different norms on the two stages, so each copy of the embedding must get a bucket of its own,
    where every dp rank owns the same flat range of both copies (else parts of it are counted twice
    in the gradient norm and saved twice). At pp=1 the one copy is not late (nothing sums it after
    backward). Bucket layouts only, built on the meta device without a process group."""
    from engine.mesh import Mesh
    from engine.pipeline.stages import build_stage_chunks
    from engine.tensor_parallel.layers import parallelize
    from engine.zero import slice_pieces, zero_bucket_key, zero_buckets
    from models.config import ModelConfig
    from models.llama import Llama

    mcfg = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=512, tie_embeddings=True)

    def mesh(pp, pp_rank, dp):
        return Mesh(pp=pp, dp=dp, tp=2, pp_rank=pp_rank, dp_rank=0, tp_rank=0, rank=0, world_size=2 * pp * dp,
                    device=torch.device("cpu"), pp_group=None, dp_group=None, tp_group=None, device_mesh=None)

    for dp in (2, 3):
        cuts = []
        for pp_rank in (0, 1):
            m = mesh(2, pp_rank, dp)
            chunks = build_stage_chunks(mcfg, m)
            for c in chunks:
                parallelize(c, m, sequence_parallel=True)
            key, emb = zero_bucket_key(chunks, m), chunks[0].tok_embeddings.weight
            assert key(emb)[2] and sum(key(p)[2] for c in chunks for p in c.parameters()) > 1   # other late params
            (ps, padded), = [(ps, n) for ps, n in zero_buckets([p for c in chunks for p in c.parameters()], key, dp)
                             if any(p is emb for p in ps)]
            assert len(ps) == 1 and ps[0] is emb, f"the tied embedding shares its bucket with {len(ps) - 1} more"
            cuts.append([[(start, stop) for _, start, stop, _ in slice_pieces([emb.numel()], padded, dp, r)]
                         for r in range(dp)])
        assert cuts[0] == cuts[1], cuts
        assert [c for r in cuts[0] for c in r] == [(i * -(-emb.numel() // dp), min((i + 1) * -(-emb.numel() // dp),
                                                    emb.numel())) for i in range(dp)]
    m = mesh(1, 0, 2)
    with torch.device("meta"):
        model = Llama(mcfg)
    parallelize(model, m, sequence_parallel=True)
    assert zero_bucket_key([model], m)(model.tok_embeddings.weight)[2:] == (False, None)
