"""Checkpoint conversion against the real client: transformers' LlamaForCausalLM.

The numerical proofs: a random Hugging Face Llama converted with from-hf gives Tandem's eval the
same loss as transformers on the same tokens; a trained Tandem checkpoint converted with to-hf
gives transformers Tandem's logits and loss; round trips are bit-identical; a checkpoint saved
sharded by the trainer at tp=2 × pp=2 converts to the very same bytes as its consolidated copy,
and Tandem's eval at tp=2 × pp=2 of a from-hf checkpoint equals transformers' loss.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import checkpoint as ckpt
from engine import convert
from engine.checkpoint import CheckpointError
from engine.convert.sources import TandemSource
from engine.data import TokenData
from models import Llama, ModelConfig
from models.shard import ShardMeta
from tests.support.distributed import run_distributed
from tests.support.launch import SMALL_MODEL, train_in_process
from tests.support.trainer_world import run_trainers

transformers = pytest.importorskip("transformers")

SEQ, BATCH = 32, 4
EVAL = [f"train.seq_len={SEQ}", f"train.global_batch_size={BATCH}", "parallel.micro_batch_size=2", "eval.batches=1"]
HF_SHAPE = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_theta=10000.0)


def random_hf_llama(path: Path, *, tied: bool, seed: int = 0, shard: str = "100KB") -> "transformers.LlamaForCausalLM":
    """A random GQA Llama saved in shards with an index (or one file, with a large ``shard``). Norm gains are randomized too, so a swapped
    input/post-attention norm could not hide behind gains of one."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_SHAPE, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size=shard)
    return model


def hf_loss(model, x, y) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item(), logits


def tandem_model(path: Path) -> Llama:
    """The serial model with weights loaded from a Tandem checkpoint through engine.checkpoint.load."""
    cfg = ModelConfig.from_dict(ckpt.read_manifest(path)["model_config"])
    model = Llama(cfg).eval()
    ckpt.load(path, [ckpt.Entry(f"model/{n}", p, ShardMeta.full(p.shape)) for n, p in model.named_parameters()])
    return model


def tandem_eval(data_dir, ckpt_dir, run_dir, *extra) -> float:
    out = train_in_process([f"data.dir={data_dir}", f"run_dir={run_dir}", f"checkpoint.load={ckpt_dir}",
                            "train.eval_only=true", f"train.seq_len={SEQ}", f"train.global_batch_size={BATCH}",
                            f"parallel.micro_batch_size={BATCH}", "eval.batches=1", *extra])
    return out[0]["eval_loss"]


def eval_tokens(data_dir):
    return TokenData(data_dir).eval_windows(0, BATCH, seq_len=SEQ)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    src = TandemSource(path)
    return {k: src.read(k) for k in src.tensors}


# -- Hugging Face -> Tandem --------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_hf_eval_equals_transformers(tied, data_dir, tmp_path):
    hf = random_hf_llama(tmp_path / "hf", tied=tied, shard="10MB" if tied else "100KB")
    # untied: sharded, read through the index; tied: one model.safetensors without an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() is not tied
    convert.from_hf(tmp_path / "hf", tmp_path / "tandem")
    x, y = eval_tokens(data_dir)
    expected, logits = hf_loss(hf, x, y)
    assert tandem_eval(data_dir, tmp_path / "tandem", tmp_path / "run") == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # rotate-half in both: q/k need no permutation, logits agree everywhere
        torch.testing.assert_close(tandem_model(tmp_path / "tandem")(x), logits, rtol=1e-5, atol=1e-5)
    # and back: HF -> Tandem -> HF holds the same tensors, bit for bit
    convert.to_hf(tmp_path / "tandem", tmp_path / "hf2", with_tokenizer=False)
    assert ("lm_head.weight" in json.loads((tmp_path / "hf2" / "model.safetensors.index.json").read_text())
            ["weight_map"]) is not tied
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    for (name, a), (_, b) in zip(hf.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


# -- Tandem -> Hugging Face --------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A Tandem checkpoint after 3 training steps (with optimizer state) of the small odd model."""
    run = tmp_path_factory.mktemp("trained")
    train_in_process([*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={run}", "train.max_steps=3",
                      "checkpoint.interval=3"])
    return run / "checkpoints" / "step_000003"


def test_to_hf_from_pretrained_gives_tandem_loss_and_logits(trained, data_dir, tmp_path):
    convert.to_hf(trained, tmp_path / "hf", max_shard_size="60KB")  # tokenizer found via the recorded data dir
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model",
            "tokenizer_config.json"} <= set(files)
    assert sum(f.startswith("model-") for f in files) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x, y = eval_tokens(data_dir)
    loss, logits = hf_loss(hf, x, y)
    assert loss == pytest.approx(tandem_eval(data_dir, trained, tmp_path / "run"), rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, tandem_model(trained)(x), rtol=1e-5, atol=1e-5)
    # the tokenizer travels: the data dir's SentencePiece model, with the configs LlamaTokenizer reads, and
    # a tokenizer.json that AutoTokenizer loads with transformers + tokenizers alone (no protobuf)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (data_dir / "tokenizer.model").read_bytes()
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer" and (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<s>", "</s>")
    assert "tokenizer.json" in files
    assert_same_ids_as_tandem(tmp_path / "hf", data_dir)
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)


def assert_same_ids_as_tandem(hf_dir: Path, data_dir: Path) -> None:
    """AutoTokenizer on the exported directory encodes a sample of the corpus (Python source: deep
    indentation, digits, non-ASCII) to exactly the ids of the data directory's tokenizer, adds BOS like
    Llama, and decodes back to the text."""
    import sentencepiece as spm

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tokenizer.model"))
    meta = json.loads((data_dir / "meta.json").read_text())
    sample = [Path(f).read_text() for f in meta["sources"][::3]] + ["x = 12345  # héllo, 日本語 😀\n\t\tpass",
                                                                   "a literal '<s>' and '</s>' <unk> is text"]
    for text in sample:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert hf_tok.decode(ids) == text
    assert hf_tok("a")["input_ids"][0] == sp.bos_id()


def test_round_trip_tandem_hf_tandem_is_bit_identical(trained, data_dir, tmp_path):
    convert.to_hf(trained, tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "back")
    # from-hf carries the tokenizer into the checkpoint, where data.tokenizer=<checkpoint dir> finds it
    from engine.data import load_tokenizer

    assert (tmp_path / "back" / "tokenizer.json").is_file() and (tmp_path / "back" / "tokenizer.model").is_file()
    carried = load_tokenizer(tmp_path / "back")
    assert carried.kind == "hf" and carried.vocab_size == 512
    text = (data_dir / "meta.json").read_text()
    assert carried.encode_batch([text]) == [load_tokenizer(data_dir / "tokenizer.model").encode_batch([text])[0]]
    before, after = tensors_of(trained), tensors_of(tmp_path / "back")
    model_keys = {k for k in before if k.startswith("model/")}
    assert model_keys == set(after)
    for k in model_keys:
        assert torch.equal(before[k], after[k]), k
    # bf16 export is the fp32 weights rounded once
    convert.to_hf(trained, tmp_path / "hf16", dtype="bf16")
    convert.from_hf(tmp_path / "hf16", tmp_path / "back16")
    w = "model/layers.1.attention.wk.weight"
    assert torch.equal(tensors_of(tmp_path / "back16")[w], before[w].bfloat16().float())


# -- the real tp=2 × pp=2 layout ---------------------------------------------------------------
PAR = ["parallel.tp=2", "parallel.pp=2"]


@pytest.fixture(scope="module")
def tp2pp2(data_dir, tmp_path_factory) -> dict:
    """One 4-process gloo world runs the trainer at tp=2 × pp=2: 3 training steps (saving a checkpoint),
    then eval_only of that checkpoint and of a random HF Llama converted with from-hf."""
    root = tmp_path_factory.mktemp("tp2pp2")
    hf = random_hf_llama(root / "hf", tied=False, seed=1)
    convert.from_hf(root / "hf", root / "from_hf")
    trained = root / "train" / "checkpoints" / "step_000003"
    ev = [f"data.dir={data_dir}", "train.eval_only=true", *EVAL, *PAR]
    runs = {"train": [*SMALL_MODEL, f"data.dir={data_dir}", f"run_dir={root / 'train'}", "train.max_steps=3",
                      "checkpoint.interval=3", *PAR],
            "eval_trained": [f"run_dir={root / 'eval_trained'}", f"checkpoint.load={trained}", *ev],
            "eval_hf": [f"run_dir={root / 'eval_hf'}", f"checkpoint.load={root / 'from_hf'}", *ev]}
    out = run_distributed(run_trainers, world_size=4, args=(runs,))[0]
    return {"hf": hf, "from_hf": root / "from_hf", "trained": trained,
            "eval_trained": out["eval_trained"][0]["eval_loss"], "eval_hf": out["eval_hf"][0]["eval_loss"]}


@pytest.fixture(scope="module")
def sharded(tp2pp2) -> Path:
    """The checkpoint the trainer saved at tp=2 x pp=2 (model and optimizer state, four rank files)."""
    return tp2pp2["trained"]


def test_from_hf_evaluates_at_tp2_pp2_like_transformers(tp2pp2, data_dir):
    x, y = eval_tokens(data_dir)
    assert tp2pp2["eval_hf"] == pytest.approx(hf_loss(tp2pp2["hf"], x, y)[0], rel=1e-5)


def test_tp2_pp2_trained_checkpoint_to_hf(tp2pp2, data_dir, tmp_path):
    convert.to_hf(tp2pp2["trained"], tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x, y = eval_tokens(data_dir)
    loss, logits = hf_loss(hf, x, y)
    assert loss == pytest.approx(tp2pp2["eval_trained"], rel=1e-5)  # Tandem's eval at tp=2 x pp=2
    with torch.no_grad():
        torch.testing.assert_close(logits, tandem_model(tp2pp2["trained"])(x), rtol=1e-5, atol=1e-5)


# -- consolidate, reshard, inspect, verify on the tp=2 × pp=2 checkpoint ----------------------
def test_sharded_checkpoint_converts_like_its_consolidated_copy(sharded, tmp_path):
    m = ckpt.read_manifest(sharded)
    assert m["layout"]["tp"] == 2 and m["layout"]["pp"] == 2 and len(m["files"]) == 4
    assert len(m["tensors"]["model/layers.0.attention.wq.weight"]["slices"]) == 2
    convert.consolidate(sharded, tmp_path / "one")
    convert.to_hf(sharded, tmp_path / "a", with_tokenizer=False)
    convert.to_hf(tmp_path / "one", tmp_path / "b", with_tokenizer=False)
    for f in (tmp_path / "a").iterdir():  # the very same bytes, whatever layout saved the weights
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    # reshard --tp 2 --pp 2 lays the consolidated copy out exactly as the tp=2 x pp=2 ranks saved it
    convert.reshard(tmp_path / "one", tmp_path / "re", tp=2, pp=2)

    def regions(path):
        return {(k, tuple(s["offset"]), tuple(s["shape"])) for k, i in ckpt.read_manifest(path)["tensors"].items()
                for s in i["slices"]}

    assert regions(tmp_path / "re") == regions(sharded)


def test_consolidate_reshard_inspect_verify(sharded, data_dir, tmp_path):
    convert.consolidate(sharded, tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["consolidated_00000.safetensors"]
    ref = tensors_of(sharded)
    one = tensors_of(tmp_path / "one")
    assert set(one) == set(ref) and all(torch.equal(one[k], ref[k]) for k in ref)  # optimizer state too
    assert all(len(i["slices"]) == 1 for i in ckpt.read_manifest(tmp_path / "one")["tensors"].values())

    convert.reshard(tmp_path / "one", tmp_path / "re", tp=2, pp=2)
    m = ckpt.read_manifest(tmp_path / "re")
    assert sorted(m["files"]) == [f"pp{p:02d}_tp{t:02d}.safetensors" for p in range(2) for t in range(2)]
    # pp rank 1, tp rank 1 holds layer 2's second half of wq (rows 24..48), in its own file
    (s,) = [s for s in m["tensors"]["model/layers.2.attention.wq.weight"]["slices"] if s["offset"] == [24, 0]]
    assert s["file"] == "pp01_tp01.safetensors" and s["shape"] == [24, 48]
    re = tensors_of(tmp_path / "re")
    assert all(torch.equal(re[k], ref[k]) for k in ref)
    for d in (sharded, tmp_path / "one", tmp_path / "re"):
        assert len(convert.verify(d)) == 2
    # the trainer loads the re-sharded checkpoint (checkpoint.load=) and evaluates it like the original
    assert tandem_eval(data_dir, tmp_path / "re", tmp_path / "r1") == tandem_eval(data_dir, sharded, tmp_path / "r2")

    info = convert.inspect(sharded)
    assert info["step"] == 3 and info["layout"]["tp"] == 2 and info["model_config"]["n_layers"] == 3
    row = next(r for r in info["tensors"] if r["key"] == "model/layers.0.feed_forward.w2.weight")
    assert row["shape"] == [48, 72] and row["dtype"] == "float32" and row["slices"] == 2
    text = convert.format_inspect(info)
    assert "model/layers.0.feed_forward.w2.weight" in text and "(48, 72)" in text


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path) -> Path:
    random_hf_llama(tmp_path / "hf", tied=False)
    return tmp_path / "hf"


def test_not_a_llama(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                    "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(CheckpointError, match="only Llama"):
        convert.from_hf(hf_dir, tmp_path / "out")
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
                                                    "rope_parameters": None}))
    with pytest.raises(CheckpointError, match="rope type 'llama3'"):
        convert.from_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_missing_index_missing_or_truncated_shard(hf_dir, tmp_path):
    index = hf_dir / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (hf_dir / shard).rename(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"missing the shard {shard}"):
        convert.from_hf(hf_dir, tmp_path / "out")
    (tmp_path / shard).rename(hf_dir / shard)
    with open(hf_dir / shard, "r+b") as f:  # a download cut short
        f.truncate((hf_dir / shard).stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{shard}' is truncated"):
        convert.from_hf(hf_dir, tmp_path / "out")
    index.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        convert.from_hf(hf_dir, tmp_path / "out")


def test_shape_mismatch_names_the_tensor(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 48\)"):
        convert.from_hf(hf_dir, tmp_path / "out")


def test_checksum_failure_and_existing_destination(hf_dir, tmp_path):
    convert.from_hf(hf_dir, tmp_path / "t")
    with pytest.raises(CheckpointError, match="already exists; choose another path or pass --force"):
        convert.from_hf(hf_dir, tmp_path / "t")
    convert.from_hf(hf_dir, tmp_path / "t", force=True)
    with pytest.raises(CheckpointError, match="no tokenizer .* pass --tokenizer"):
        convert.to_hf(tmp_path / "t", tmp_path / "out")
    (f,) = (tmp_path / "t").glob("*.safetensors")
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f.name} does not match its checksum"):
        convert.to_hf(tmp_path / "t", tmp_path / "out", with_tokenizer=False)
    with pytest.raises(CheckpointError, match="failed verification"):
        convert.verify(tmp_path / "t")
    assert not (tmp_path / "out").exists()


def test_verify_finds_gaps_and_overlaps(sharded, tmp_path):
    for damage, message in (("gap", "part of the tensor is missing"), ("overlap", "overlap")):
        d = tmp_path / damage
        shutil.copytree(sharded, d)
        m = json.loads((d / "manifest.json").read_text())
        slices = m["tensors"]["model/layers.1.feed_forward.w1.weight"]["slices"]
        if damage == "gap":
            slices.pop()
        else:
            slices[1]["offset"] = [slices[1]["offset"][0] - 1, 0]
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match=rf"'model/layers.1.feed_forward.w1.weight'.*{message}"):
            convert.verify(d)
        with pytest.raises(CheckpointError, match="layers.1.feed_forward.w1.weight"):
            convert.to_hf(d, tmp_path / f"hf_{damage}", with_tokenizer=False)


def test_command_line(hf_dir, tmp_path, capsys):
    from scripts.convert_checkpoint import main

    assert main(["from-hf", str(hf_dir), str(tmp_path / "t")]) == 0
    assert main(["verify", str(tmp_path / "t")]) == 0
    assert main(["inspect", str(tmp_path / "t")]) == 0
    assert "model/layers.2.feed_forward.w3.weight" in capsys.readouterr().out
    assert main(["inspect", str(hf_dir)]) == 0  # a Hugging Face directory too
    out = capsys.readouterr().out
    assert "model.layers.2.mlp.up_proj.weight" in out and "n_kv_heads=2" in out
    assert main(["from-hf", str(hf_dir), str(tmp_path / "t")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_reshard_with_empty_end_chunks(hf_dir, tmp_path, capsys):
    """--layers-per-stage may leave the first chunk embedding-only and the last head-only (as
    parallel.layers_per_stage may): pp rank 0's file then holds just the embedding, the last rank's
    just the final norm and head; every tensor still lands once, unchanged. A middle chunk with no
    layers is refused by the library and the command line alike."""
    convert.from_hf(hf_dir, tmp_path / "t")
    ref = tensors_of(tmp_path / "t")

    def params_per_file(path):
        out = {}
        for k, info in ckpt.read_manifest(path)["tensors"].items():
            for s in info["slices"]:
                out.setdefault(s["file"], set()).add(ckpt.param_of(k))
        return out

    layer_params = {ckpt.param_of(k) for k in ref if ckpt.param_of(k).startswith("layers.")}
    for pp, layers in ((2, [0, 3]), (3, [0, 3, 0])):
        dst = tmp_path / f"pp{pp}"
        convert.reshard(tmp_path / "t", dst, tp=1, pp=pp, layers_per_stage=layers)
        files = params_per_file(dst)
        assert files["pp00_tp00.safetensors"] == {"tok_embeddings.weight"}
        last = {"norm.weight", "output.weight"}
        assert files[f"pp{pp - 1:02d}_tp00.safetensors"] == (last if pp == 3 else last | layer_params)
        if pp == 3:
            assert files["pp01_tp00.safetensors"] == layer_params
        assert ckpt.read_manifest(dst)["layout"]["files_for"]["layers_per_chunk"] == layers
        got = tensors_of(dst)
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
        assert len(convert.verify(dst)) == 2
    with pytest.raises(CheckpointError, match=r"--layers-per-stage=\[2, 0, 1\] gives stage 1 no layers"):
        convert.reshard(tmp_path / "t", tmp_path / "bad", tp=1, pp=3, layers_per_stage=[2, 0, 1])
    from scripts.convert_checkpoint import main

    assert main(["reshard", str(tmp_path / "t"), str(tmp_path / "bad"), "--tp", "1", "--pp", "3",
                 "--layers-per-stage", "2,0,1"]) == 2
    assert "gives stage 1 no layers; only the first stage (embedding only)" in capsys.readouterr().err
