import pytest
import torch

from models import Llama, ModelConfig, ShardMeta, init_weights
from models.init import normal_slice

CFG = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=101, max_seq_len=32)


def build(cfg=CFG, layers=None, seed=0):
    with torch.device("meta"):
        m = Llama(cfg, layers=layers)
    return init_weights(m, seed=seed, n_layers=cfg.n_layers, device="cpu")


def test_shapes_and_param_count():
    m = build()
    x = torch.randint(0, CFG.vocab_size, (2, 11))
    assert m(x).shape == (2, 11, CFG.vocab_size)
    assert sum(p.numel() for p in m.parameters()) == CFG.num_params()
    assert m.layers["2"].attention.wk.weight.shape == (2 * 8, 48)  # GQA: 2 kv heads of 8


def test_causal_masking_future_tokens_do_not_change_past_logits():
    m = build()
    x = torch.randint(0, CFG.vocab_size, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % CFG.vocab_size
    torch.testing.assert_close(m(x)[:, :7], m(y)[:, :7])
    assert not torch.allclose(m(x)[:, 7:], m(y)[:, 7:])


@pytest.mark.parametrize("tied", [False, True])
def test_stage_chain_equals_full_model(tied):
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
    full = build(cfg)
    stages = [build(cfg, layers=r) for r in ((0, 1), (1, 1), (1, 3))]  # an empty middle stage too
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    h = x
    for s in stages:
        h = s(h)
    torch.testing.assert_close(h, full(x), rtol=0, atol=0)
    if tied:  # the last stage keeps a copy of the embedding under the same name
        assert torch.equal(stages[-1].tok_embeddings.weight, full.tok_embeddings.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_empty_end_stages_hold_only_the_embedding_or_the_head(tied):
    """first=/last= name the pipeline's ends when the layer range cannot: (0, 0) first is the
    embedding alone, its neighbour (0, 3) is not first though it starts at 0; (3, 3) last is the norm,
    head and loss alone (with tied embeddings its own copy of the table)."""
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
    full = build(cfg)

    def stage(layers, first, last):
        with torch.device("meta"):
            m = Llama(cfg, layers=layers, first=first, last=last)
        return init_weights(m, seed=0, n_layers=cfg.n_layers, device="cpu")

    head = {"norm.weight", "tok_embeddings.weight" if tied else "output.weight"}
    for chain in ([((0, 0), True, False), ((0, 3), False, True)],
                  [((0, 3), True, False), ((3, 3), False, True)],
                  [((0, 0), True, False), ((0, 3), False, False), ((3, 3), False, True)]):
        stages = [stage(*s) for s in chain]
        names = [{n for n, _ in s.named_parameters()} for s in stages]
        if chain[0][0] == (0, 0):
            assert names[0] == {"tok_embeddings.weight"} and "tok_embeddings.weight" not in names[1] - head
        if chain[-1][0] == (3, 3):
            assert names[-1] == head
        x = torch.randint(0, cfg.vocab_size, (2, 9))
        h = x
        for s in stages:
            h = s(h)
        torch.testing.assert_close(h, full(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"layer range \(1, 3\) cannot be the first stage"):
        Llama(cfg, layers=(1, 3), first=True)
    with pytest.raises(ValueError, match=r"layer range \(0, 2\) cannot be the last stage"):
        Llama(cfg, layers=(0, 2), last=True)


def test_init_depends_only_on_seed_and_name():
    a, b = build(layers=(0, 2)), build(layers=(1, 3))
    for name, p in a.named_parameters():
        if name.startswith("layers.1."):
            assert torch.equal(p, b.get_parameter(name)), name
    assert not torch.equal(build(seed=1).layers["0"].attention.wq.weight, a.layers["0"].attention.wq.weight)
    # different names draw different values
    assert not torch.equal(a.layers["1"].feed_forward.w1.weight, a.layers["1"].feed_forward.w3.weight)


def test_init_slices_match_the_global_tensor():
    full = ShardMeta.full((700, 5))
    g = normal_slice(3, "w", full, 0.02)
    for off, n in ((0, 256), (200, 300), (513, 187), (699, 1)):
        part = normal_slice(3, "w", ShardMeta((700, 5), (off, 0), (n, 5)), 0.02)
        assert torch.equal(part, g[off:off + n])
    cols = normal_slice(3, "w", ShardMeta((700, 5), (10, 2), (20, 3)), 0.02)
    assert torch.equal(cols, g[10:30, 2:5])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_heads 6 is not divisible by n_kv_heads 4"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model preset 'llama9'.*tiny"):
        ModelConfig.from_name("llama9")
    with pytest.raises(ValueError, match="outside"):
        Llama(CFG, layers=(2, 5))


def test_presets_have_published_sizes():
    assert 7.9e9 < ModelConfig.from_name("llama3_8b").num_params() < 8.1e9
    assert 1.2e9 < ModelConfig.from_name("llama3_1b").num_params() < 1.3e9
