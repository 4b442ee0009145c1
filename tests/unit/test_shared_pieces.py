"""Fixed-value tests of the pieces every layout shares.

Every parallel test compares a layout against a serial run of the same code, so a bug in a piece
both sides share (the optimizer's parameter groups, the learning-rate schedule, clipping,
initialization, rotary embeddings, the model's size formulas) passes all of them. Here each of those
pieces is checked against numbers computed by hand (written into the test) or by an independent
implementation (torch's own AdamW step arithmetic, transformers' LlamaForCausalLM), never by
calling the code under test a second time.
"""
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.optim import Optimizer, ParamRef, clip_grad_norm, lr_at, param_refs
from models import Llama, ModelConfig, ShardMeta, init_weights, set_shard_meta
from models.init import init_std

SMALL = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=101, max_seq_len=64)


def fake_mesh(dp: int = 1, dp_rank: int = 0):
    """What `Optimizer.__init__` reads of a mesh; no process group is needed to build it."""
    return SimpleNamespace(dp=dp, dp_rank=dp_rank)


def small_model(**over) -> Llama:
    cfg = ModelConfig(**{**SMALL, **over})
    return init_weights(Llama(cfg), seed=0, n_layers=cfg.n_layers)


# -- optimizer parameter groups ----------------------------------------------------------------
# written out by hand for SMALL (2 layers, untied): what decays and what does not
DECAY = {"tok_embeddings.weight", "output.weight"} | {
    f"layers.{i}.{w}.weight" for i in range(2)
    for w in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
NO_DECAY = {"norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")}


def _group_names(opt: Optimizer, refs) -> list[tuple[float, set[str]]]:
    name_of = {id(r.param): r.name for r in refs}
    return [(g["weight_decay"], {name_of[id(p)] for p in g["params"]}) for g in opt.inner.param_groups]


def test_optimizer_groups_decay_exactly_the_matrices():
    model = small_model()
    refs = param_refs([model])
    assert {r.name for r in refs} == DECAY | NO_DECAY and len(refs) == len(DECAY | NO_DECAY)
    # a 1-D parameter that is not a norm gain (a bias) does not decay either
    refs.append(ParamRef("extra.bias", nn.Parameter(torch.ones(5)), ShardMeta.full((5,))))
    opt = Optimizer(refs, fake_mesh(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.25)
    assert _group_names(opt, refs) == [(0.25, DECAY), (0.0, NO_DECAY | {"extra.bias"})]


def test_optimizer_step_decays_matrices_and_leaves_gains_alone():
    """With zero gradients AdamW's update is pure decoupled decay: p ← p·(1 − lr·wd) for the
    matrices, p unchanged for the norm gains (which are exactly one after init)."""
    model = small_model()
    refs = param_refs([model])
    before = {r.name: r.param.detach().clone() for r in refs}
    opt = Optimizer(refs, fake_mesh(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    for r in refs:
        r.param.grad = torch.zeros_like(r.param)
    opt.step(0.1)
    assert all(g["lr"] == 0.1 for g in opt.inner.param_groups)
    for r in refs:
        if r.name in NO_DECAY:
            assert torch.equal(r.param.detach(), before[r.name]), r.name
        else:  # 1 - 0.1 * 0.5 = 0.95
            torch.testing.assert_close(r.param.detach(), before[r.name] * 0.95, rtol=1e-6, atol=0, msg=r.name)


def _sized_refs(sizes: dict[str, int]) -> list[ParamRef]:
    return [ParamRef(n, nn.Parameter(torch.zeros(s)), ShardMeta.full((s,))) for n, s in sizes.items()]


def test_zero_partition_by_hand():
    # greedy largest first onto the least-loaded rank (lowest index on ties), equal sizes by name:
    # a10→0 (10|0), b7→1 (10|7), c5→1 (10|12), d4→0 (14|12), e3→1 (14|15)
    refs = _sized_refs({"c": 5, "e": 3, "a": 10, "d": 4, "b": 7})
    assert Optimizer._partition(refs, 2) == [1, 1, 0, 0, 1]
    # equal sizes go by name, whatever the order they are held in
    assert Optimizer._partition(_sized_refs({"y": 4, "x": 4}), 2) == [1, 0]
    assert Optimizer._partition(_sized_refs({"x": 4, "y": 4}), 2) == [0, 1]


@pytest.mark.parametrize("dp", [2, 3])
def test_zero_partition_of_the_model_covers_each_parameter_once(dp):
    model = small_model()
    refs = param_refs([model])
    numel = {r.name: r.param.numel() for r in refs}
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, zero=1)
    opts = [Optimizer(refs, fake_mesh(dp, k), **kw) for k in range(dp)]
    mine = [[r.name for r in o.mine] for o in opts]
    # every parameter once, on exactly one dp rank
    flat = [n for m in mine for n in m]
    assert sorted(flat) == sorted(numel) and len(set(flat)) == len(flat)
    # every rank agrees on the owners, and each owner's groups hold its own parameters, split as above
    for k, o in enumerate(opts):
        assert o.owner_dp == opts[0].owner_dp
        assert {n for n, owner in zip([r.name for r in refs], o.owner_dp) if owner == k} == set(mine[k])
        groups = dict((wd, names) for wd, names in _group_names(o, refs))
        assert groups.get(0.1, set()) == set(mine[k]) & DECAY and groups.get(0.0, set()) == set(mine[k]) & NO_DECAY
    # balanced: greedy largest-first leaves the loads within one largest parameter of each other
    loads = [sum(numel[n] for n in m) for m in mine]
    assert max(loads) - min(loads) <= max(numel.values()), loads
    assert all(load > 0 for load in loads)
    # deterministic: the same owner for each name in any holding order
    shuffled = refs[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip([r.name for r in shuffled], Optimizer._partition(shuffled, dp)))
    assert again == dict(zip([r.name for r in refs], opts[0].owner_dp))


# -- learning-rate schedule --------------------------------------------------------------------
LR = dict(lr=1e-3, warmup_steps=4, max_steps=14, min_lr_ratio=0.25)


@pytest.mark.parametrize("step,expected", [
    (0, 2.5e-4),            # warm-up start: lr · 1/4
    (1, 5.0e-4),            # warm-up middle: lr · 2/4
    (3, 1.0e-3),            # warm-up end: lr · 4/4
    (4, 1.0e-3),            # cosine start: progress 0
    (6, 9.2838137e-4),      # progress 0.2: 0.25 + 0.75 · (1 + cos 0.2π)/2
    (9, 6.25e-4),           # cosine middle: 0.25 + 0.75 · 0.5
    (12, 3.2161863e-4),     # progress 0.8
    (14, 2.5e-4),           # max_steps: lr · min_lr_ratio
    (15, 2.5e-4),           # after max_steps: stays there
    (1000, 2.5e-4),
])
def test_lr_schedule_fixed_values(step, expected):
    assert lr_at(step, **LR) == pytest.approx(expected, rel=1e-7, abs=0)


def test_lr_schedule_min_ratio_zero_and_one():
    assert lr_at(14, **{**LR, "min_lr_ratio": 0.0}) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(9, **{**LR, "min_lr_ratio": 0.0}) == pytest.approx(5e-4, rel=1e-12)
    assert all(lr_at(s, **{**LR, "min_lr_ratio": 1.0}) == pytest.approx(1e-3) for s in range(3, 20))


# -- gradient clipping -------------------------------------------------------------------------
def _ref(name, grad, meta=None, owner=True):
    p = nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    return ParamRef(name, p, meta or ShardMeta.full(grad.shape), norm_owner=owner)


def _clip_refs():
    """Norm by hand: sqrt(3² + 4² + 12²) = 13. The padding row (100s) and the non-owner (1000s)
    must not count."""
    a = _ref("a", torch.tensor([[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]),
             ShardMeta(global_shape=(5, 2), offset=(3, 0), shape=(2, 2)))  # rows 3..4 of 5, one padding row
    b = _ref("b", torch.tensor([12.0]))
    c = _ref("c", torch.full((3,), 1000.0), owner=False)  # a replica another rank counts
    n = _ref("n", torch.zeros(2))
    n.param.grad = None  # a parameter without a gradient is skipped
    return [a, b, c, n]


def test_clip_grad_norm_scales_when_above():
    refs = _clip_refs()
    before = [r.param.grad.clone() if r.param.grad is not None else None for r in refs]
    norm = clip_grad_norm(refs, 1.0, torch.device("cpu"))
    assert norm.dtype == torch.float64 and norm.shape == () and norm.device.type == "cpu"
    assert norm.item() == pytest.approx(13.0, rel=1e-12)
    scale = 1.0 / (13.0 + 1e-6)
    for r, g in zip(refs, before):
        if g is None:
            assert r.param.grad is None
        else:  # every held gradient, padding and non-owned replicas included, by the same factor
            torch.testing.assert_close(r.param.grad, g * scale, rtol=1e-6, atol=0, msg=r.name)


@pytest.mark.parametrize("max_norm", [13.5, 100.0, 0.0])
def test_clip_grad_norm_leaves_gradients_below_max_alone(max_norm):
    refs = _clip_refs()
    before = [r.param.grad.clone() for r in refs[:3]]
    norm = clip_grad_norm(refs, max_norm, torch.device("cpu"))
    assert norm.item() == pytest.approx(13.0, rel=1e-12)
    for r, g in zip(refs, before):
        assert torch.equal(r.param.grad, g), r.name


def test_clip_grad_norm_of_a_model_matches_torch():
    """Cross-check on a whole model against torch.nn.utils.clip_grad_norm_ (another implementation)."""
    model = small_model()
    x = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    model(x[:, :-1], x[:, 1:]).backward()
    copies = [p.grad.clone() for p in model.parameters()]
    expected = torch.nn.utils.clip_grad_norm_([nn.Parameter(torch.zeros(0))] + [
        _with_grad(g) for g in copies], 0.05)
    got = clip_grad_norm(param_refs([model]), 0.05, torch.device("cpu"))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0.05  # so the scaling branch ran
    for p, g in zip(model.parameters(), copies):
        torch.testing.assert_close(p.grad, g * (0.05 / (got.item() + 1e-6)), rtol=1e-5, atol=1e-9)


def _with_grad(g):
    p = nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    return p


# -- initialization ----------------------------------------------------------------------------
INIT_CFG = ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, vocab_size=1024, max_seq_len=64)


@pytest.fixture(scope="module")
def inited():
    return init_weights(Llama(INIT_CFG), seed=0, n_layers=INIT_CFG.n_layers)


def test_init_std_values():
    assert init_std("layers.3.attention.wq.weight", 4) == 0.02
    assert init_std("tok_embeddings.weight", 4) == 0.02
    assert init_std("output.weight", 4) == 0.02
    assert init_std("layers.0.attention.wo.weight", 4) == pytest.approx(0.00707106781, rel=1e-9)  # 0.02/√8
    assert init_std("layers.0.feed_forward.w2.weight", 8) == pytest.approx(0.005, rel=1e-12)   # 0.02/√16
    assert init_std("layers.0.ffn_norm.weight", 4) is None
    assert init_std("norm.weight", 4) is None


def test_init_statistics(inited):
    residual = 0.02 / math.sqrt(2 * 4)
    seen = set()
    for name, p in inited.named_parameters():
        v = p.detach().double()
        if name.endswith("norm.weight"):
            assert torch.equal(p.detach(), torch.ones_like(p)), name
            seen.add("norm")
            continue
        std = residual if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
        # ≥ 18k samples: the sample std is within ~0.5% of the true one; 3% is far outside noise
        assert v.std().item() == pytest.approx(std, rel=0.03), name
        assert abs(v.mean().item()) < 5 * std / math.sqrt(v.numel()), name
        seen.add("residual" if std == residual else "plain")
    assert seen == {"norm", "residual", "plain"}


def test_init_values_differ_by_name_and_seed():
    cfg = ModelConfig(**SMALL)
    w = dict(small_model().named_parameters())
    assert not torch.equal(w["layers.0.attention.wq.weight"], w["layers.1.attention.wq.weight"])
    assert not torch.equal(w["layers.0.feed_forward.w1.weight"], w["layers.0.feed_forward.w3.weight"])
    assert not torch.equal(w["tok_embeddings.weight"], w["output.weight"])
    other = init_weights(Llama(cfg), seed=1, n_layers=cfg.n_layers)
    for name, p in other.named_parameters():
        if not name.endswith("norm.weight"):
            assert not torch.equal(p, w[name]), name
    again = init_weights(Llama(cfg), seed=0, n_layers=cfg.n_layers)
    for name, p in again.named_parameters():
        assert torch.equal(p, w[name]), name  # a function of (seed, name) only


def test_init_shard_equals_slice_of_whole():
    cfg = ModelConfig(**{**SMALL, "vocab_size": 600})
    whole = init_weights(Llama(cfg), seed=3, n_layers=cfg.n_layers)
    part = Llama(cfg)
    # rows 200..449 of the 600-row head (across the 256-row block boundary), held in 256 rows: 6 of padding
    part.output = nn.Linear(cfg.dim, 256, bias=False)
    set_shard_meta(part.output, "weight", ShardMeta((600, cfg.dim), (200, 0), (250, cfg.dim)))
    # columns 24..47 of a residual projection (a row-parallel shard)
    wo = part.layers["1"].attention
    wo.wo = nn.Linear(24, cfg.dim, bias=False)
    set_shard_meta(wo.wo, "weight", ShardMeta((cfg.dim, 48), (0, 24), (cfg.dim, 24)))
    init_weights(part, seed=3, n_layers=cfg.n_layers)
    full = dict(whole.named_parameters())
    assert torch.equal(part.output.weight[:250], full["output.weight"][200:450])
    assert torch.equal(part.output.weight[250:], torch.zeros(6, cfg.dim))
    assert torch.equal(wo.wo.weight, full["layers.1.attention.wo.weight"][:, 24:])
    for name, p in part.named_parameters():  # everything else is whole and identical
        if name not in ("output.weight", "layers.1.attention.wo.weight"):
            assert torch.equal(p, full[name]), name


# -- rotary embeddings against transformers ----------------------------------------------------
def _hf_and_tandem(theta: float):
    transformers = pytest.importorskip("transformers")
    from engine.convert.names import to_hf_name

    hf_cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # norm gains random too, so none hides behind ones
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    ours = Llama(ModelConfig(**SMALL, rope_theta=theta, norm_eps=1e-5)).eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(hf_params[to_hf_name(name)])
    return hf, ours


ROPE_TOKENS = torch.randint(0, 101, (2, 48), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def rope_logits():
    out = {}
    for theta in (500000.0, 1234.5):
        hf, ours = _hf_and_tandem(theta)
        with torch.no_grad():
            out[theta] = (ours(ROPE_TOKENS), hf(input_ids=ROPE_TOKENS).logits)
    return out


@pytest.mark.parametrize("theta", [500000.0, 1234.5])
def test_rope_theta_logits_equal_transformers(rope_logits, theta):
    ours, theirs = rope_logits[theta]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_rope_theta_changes_the_logits(rope_logits):
    """Same weights, two thetas: the logits must differ far beyond the tolerance above, so the
    comparison with transformers cannot pass with theta ignored."""
    a, b = rope_logits[500000.0][0], rope_logits[1234.5][0]
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-5, atol=1e-5)  # position 0 is not rotated
    assert (a - b).abs().max() > 1e-2


# -- model size formulas -----------------------------------------------------------------------
def test_num_params_and_flops_by_hand():
    cfg = ModelConfig(**SMALL)  # dim 48, 2 layers, 6 heads of 8, 2 kv heads, ffn 72, vocab 101
    # per layer: wq 48·48 + wk 48·16 + wv 48·16 + wo 48·48 = 6144; w1,w2,w3 3·48·72 = 10368; 2 norms 96
    per_layer = 6144 + 10368 + 96
    assert per_layer == 16608
    non_emb = 2 * per_layer + 48           # + final norm = 33264
    assert cfg.num_params(embeddings=False) == 33264 == non_emb
    assert cfg.num_params() == 33264 + 2 * 101 * 48 == 42960
    tied = ModelConfig(**SMALL, tie_embeddings=True)
    assert tied.num_params() == 33264 + 101 * 48 == 38112
    assert tied.num_params(embeddings=False) == 33264
    # the model's own parameter count agrees (tied counted once)
    assert sum(p.numel() for p in Llama(cfg).parameters()) == 42960
    assert sum(p.numel() for p in Llama(tied).parameters()) == 38112
    # 6·(non-embedding + head) + 12·layers·dim·seq: 6·(33264 + 4848) + 12·2·48·32 = 228672 + 36864
    assert cfg.flops_per_token(32) == 265536
    assert tied.flops_per_token(32) == 265536  # the tied head is still a matmul
    assert cfg.flops_per_token(64) == 228672 + 73728
