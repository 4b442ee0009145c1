"""Triton kernels against their plain-torch references, forward and backward.

On a CPU-only machine the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), which is slow, so shapes are tiny and odd:
hidden 123, 5 x 37 rows, head_dim 24, vocabulary 91. With CUDA the same tests run compiled on the GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import TORCH_OPS, get_ops, rope_cos_sin
from kernels.cross_entropy import cross_entropy, cross_entropy_reference, cross_entropy_torch
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.rotary import apply_rotary, apply_rotary_reference
from kernels.swiglu import swiglu, swiglu_reference
from tests.support.distributed import run_distributed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Tolerances that hold on a GPU as well as in the interpreter. bfloat16 keeps 8 bits of mantissa: the
# two paths round once each, so they may differ by an ulp (and Triton's interpreter truncates float32 ->
# bfloat16 where the GPU rounds to nearest). float32: compiled, tl.sqrt and tl.exp are sqrt.approx and
# ex2.approx (a few ulp, ~3e-7 relative), 1/x is an approximate division, and a block's sum is a tree
# where torch sums in another order (error ~ log2(N) ulp); FMA contraction is pinned off
# (kernels/_triton.py FP_FUSION), so products are rounded as torch rounds them. That is at most a few
# times 1e-6 relative on these shapes, inside 1e-5. The absolute tolerance is relative to the tensor's
# largest value, so sums with cancellation (dw) are judged fairly.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def randn(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


def fwd_bwd(fn, inputs, *args, **kwargs):
    """Output(s) of fn, and the gradients of a fixed random projection of them w.r.t. ``inputs``."""
    out = fn(*inputs, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g, device=DEVICE)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, inputs)


def assert_same(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        scale = max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])


# ---- RMSNorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_reference(dtype, residual):
    torch.manual_seed(0)
    x = randn(5, 37, 123, dtype=dtype)
    w = (1 + 0.1 * torch.randn(123, device=DEVICE)).requires_grad_()
    inputs = [x, w] + ([randn(5, 37, 123, dtype=dtype)] if residual else [])

    def call(impl):
        return lambda x, w, *r: impl(x, w, 1e-5, residual=r[0] if r else None)

    got_out, got_grad = fwd_bwd(call(rms_norm), inputs)
    want_out, want_grad = fwd_bwd(call(rms_norm_reference), inputs)
    assert_same(got_out, want_out, dtype)
    assert_same(got_grad, want_grad, dtype)


def test_rms_norm_non_contiguous_rows_and_expanded_grad():
    torch.manual_seed(0)
    base = randn(7, 200, grad=False)
    x = base[1:6, 3:126].requires_grad_()  # (5, 123), row stride 200: read in place, no copy
    w = randn(123)
    got = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-6), **TOL[torch.float32])
    gx, gw = torch.autograd.grad(got.sum(), [x, w])  # dy is an expanded (stride 0) tensor
    rx, rw = torch.autograd.grad(rms_norm_reference(x, w, 1e-6).sum(), [x, w])
    assert_same([gx, gw], [rx, rw], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_column_blocks_match_reference(dtype, residual):
    """Rows longer than one block (hidden > ROW_BLOCK on a GPU): here blocks of 16 columns, so hidden 123
    takes 8 steps, the last partial, and the backward's grid has 8 column blocks and several row ranges."""
    from kernels.rms_norm import rms_norm_backward, rms_norm_forward

    torch.manual_seed(1)
    x, dy = randn(3, 5, 123, dtype=dtype), randn(3, 5, 123, dtype=dtype, grad=False)
    w = (1 + 0.1 * torch.randn(123, device=DEVICE)).requires_grad_()
    r = randn(3, 5, 123, dtype=dtype) if residual else None
    ds = randn(3, 5, 123, dtype=dtype, grad=False) if residual else None
    y, s, rstd = rms_norm_forward(x.detach(), w.detach(), 1e-5, None if r is None else r.detach(), row_block=16)
    dx, dw = rms_norm_backward(dy, s, w.detach(), rstd, ds, row_block=16, col_block=16)
    want = rms_norm_reference(x, w, 1e-5, residual=r)
    want_y, want_s = want if residual else (want, x)
    loss = (want_y.float() * dy.float()).sum() + ((want_s.float() * ds.float()).sum() if residual else 0)
    want_dx, want_dw = torch.autograd.grad(loss, [x, w])
    assert_same([y.view(x.shape), s.view(x.shape)], [want_y, want_s], dtype)
    assert_same([dx.view(x.shape), dw], [want_dx, want_dw], dtype)


def test_rms_norm_strided_weight():
    """A weight that is a strided view (every other element of a buffer) is read as its values."""
    torch.manual_seed(2)
    x = randn(5, 123)
    w = (1 + 0.1 * torch.randn(246, device=DEVICE))[::2].requires_grad_()
    assert w.stride(0) == 2
    got = fwd_bwd(lambda x, w: rms_norm(x, w, 1e-5), [x, w])
    want = fwd_bwd(lambda x, w: rms_norm_reference(x, w, 1e-5), [x, w])
    assert_same(got[0] + got[1], want[0] + want[1], torch.float32)


# ---- SwiGLU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 37), (3, 5, 123)])
def test_swiglu_matches_reference(dtype, shape):
    torch.manual_seed(0)
    inputs = [randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)]
    got = fwd_bwd(swiglu, inputs)
    want = fwd_bwd(swiglu_reference, inputs)
    assert_same(got[0] + got[1], want[0] + want[1], dtype)


def test_swiglu_non_contiguous():
    torch.manual_seed(0)
    gate_up = randn(5, 2 * 37, grad=False)
    gate, up = gate_up[:, :37].requires_grad_(), gate_up.t().contiguous().t()[:, 37:].requires_grad_()
    got = fwd_bwd(swiglu, [gate, up])
    want = fwd_bwd(swiglu_reference, [gate, up])
    assert_same(got[0] + got[1], want[0] + want[1], torch.float32)


# ---- rotary ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rotary_matches_reference(dtype, contiguous):
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 24
    if contiguous:
        x = randn(B, T, H, D, dtype=dtype)
    else:  # a (B, H, T, D) tensor seen as (B, T, H, D), as after a transpose
        x = randn(B, H, T, D, dtype=dtype, grad=False).transpose(1, 2).requires_grad_()
    cos, sin = rope_cos_sin(T, D, 10000.0, device=DEVICE)
    got = fwd_bwd(apply_rotary, [x], cos, sin)
    want = fwd_bwd(apply_rotary_reference, [x], cos, sin)
    assert_same(got[0] + got[1], want[0] + want[1], dtype)


def test_rotary_backward_with_unequal_halves_of_sin():
    """The backward is the transpose, not the inverse rotation: check it for general cos/sin tables."""
    torch.manual_seed(0)
    x = randn(1, 3, 2, 6)
    cos, sin = randn(3, 6, grad=False), randn(3, 6, grad=False)
    got = fwd_bwd(apply_rotary, [x], cos, sin)
    want = fwd_bwd(apply_rotary_reference, [x], cos, sin)
    assert_same(got[0] + got[1], want[0] + want[1], torch.float32)


# ---- cross-entropy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_matches_reference(dtype, ignore_index):
    torch.manual_seed(0)
    logits = randn(5, 37, 91, dtype=dtype)
    targets = torch.randint(0, 91, (5, 37), device=DEVICE)
    targets[0, :11] = ignore_index
    targets[3, 4] = ignore_index

    def call(impl):  # scaled by 2.5: the backward must multiply by the incoming gradient
        return lambda lg: 2.5 * impl(lg * 1.0, targets, ignore_index=ignore_index)  # non-leaf: in place

    got = fwd_bwd(call(cross_entropy), [logits])
    want = fwd_bwd(call(cross_entropy_reference), [logits])
    assert got[0][0].dtype == torch.float32
    assert_same(got[0] + got[1], want[0] + want[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leaf", [False, True])
def test_torch_path_cross_entropy_matches_f_cross_entropy(dtype, leaf):
    """kernels=torch's loss (gradient computed in the forward, in place on intermediate float32
    logits) against F.cross_entropy: loss, gradient under a scaled loss, ignored rows, a second
    backward through the same graph, and a leaf left intact."""
    torch.manual_seed(0)
    base = randn(5, 37, 91, dtype=dtype)
    targets = torch.randint(0, 91, (5, 37), device=DEVICE)
    targets[0, :11] = -100
    before = base.detach().clone()
    logits = base if leaf else base * 1.0
    loss = 2.5 * cross_entropy_torch(logits, targets)
    (g1,) = torch.autograd.grad(loss, [base], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [base])
    want_loss = 2.5 * F.cross_entropy(before.float().reshape(-1, 91), targets.reshape(-1))
    (want,) = torch.autograd.grad(2.5 * F.cross_entropy(base.float().reshape(-1, 91), targets.reshape(-1)), [base])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, **TOL[torch.float32])
    assert_same([g1, g2], [want, want], dtype)
    assert torch.equal(base.detach(), before)
    assert not g1.reshape(-1, 91)[:11].any()          # ignored rows get no gradient


def test_cross_entropy_leaf_and_strided_logits_are_left_intact():
    torch.manual_seed(0)
    wide = randn(4, 7, 100, grad=False)
    for logits in (wide[..., :91].clone().requires_grad_(), wide[..., :91].requires_grad_()):
        before = logits.detach().clone()
        targets = torch.randint(0, 91, (4, 7), device=DEVICE)
        loss = cross_entropy(logits, targets)
        (grad,) = torch.autograd.grad(loss, [logits])
        assert torch.equal(logits.detach(), before)
        want = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 91), targets.reshape(-1)), [logits])[0]
        torch.testing.assert_close(grad, want, **TOL[torch.float32])


def test_cross_entropy_strided_targets():
    """Targets that are a strided view (a column of a (rows, 2) tensor) are read as their values."""
    torch.manual_seed(3)
    logits = randn(37, 91)
    pairs = torch.randint(0, 91, (37, 2), device=DEVICE)
    targets = pairs[:, 1]
    assert targets.stride(0) == 2
    got = fwd_bwd(lambda lg: cross_entropy(lg * 1.0, targets), [logits])
    want = fwd_bwd(lambda lg: cross_entropy_reference(lg, targets), [logits])
    assert_same(got[0] + got[1], want[0] + want[1], torch.float32)


def test_every_launch_pins_fp_fusion_and_is_recordable():
    """Launchers called on meta tensors inside recording_launches record, not run, their launches, and
    every launch carries the pinned enable_fp_fusion (as the ahead-of-time compile check does)."""
    from kernels import compile_check
    from kernels._triton import FP_FUSION, recording_launches

    seen = set()
    for _, call in compile_check.cases(compile_check.QUICK):
        with recording_launches(sm_count=132) as launches:
            call()
        assert launches
        for launch in launches:
            assert launch.kwargs["enable_fp_fusion"] is FP_FUSION
            seen.add(launch.kernel.__name__)
    assert {"_rms_norm_bwd_blocked_kernel", "_ce_grad_kernel", "_rotary_kernel", "_swiglu_bwd_kernel"} <= seen


def test_cross_entropy_overwrites_saved_logits_loudly():
    """The gradient is written into the logits' storage; an op that saved them for its backward must
    fail in autograd rather than silently read the gradient."""
    x = randn(3, 17)
    logits = x.exp()  # exp saves its output
    loss = cross_entropy(logits, torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_second_backward_is_a_clear_error():
    loss = cross_entropy(randn(3, 17) * 1.0, torch.tensor([1, 2, 3], device=DEVICE)) / 4
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = randn(4, 9)
    loss = cross_entropy(logits * 1.0, torch.full((4,), -100, device=DEVICE))
    (grad,) = torch.autograd.grad(loss, [logits])
    assert loss.item() == 0.0 and not grad.any()


def test_cross_entropy_without_grad_keeps_logits():
    logits = randn(6, 33, grad=False)
    before = logits.clone()
    targets = torch.randint(0, 33, (6,), device=DEVICE)
    loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    assert torch.equal(logits, before)


def _vocab_full_problem(dtype):
    torch.manual_seed(0)  # the same full logits and targets on every rank and in the parent
    full = torch.randn(5, 37, 90).to(dtype)
    targets = torch.randint(0, 90, (5, 37))
    targets[1, :9] = -100
    return full, targets


MODEL_CFG = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=97, max_seq_len=16)


def count_fused_residual_norms(monkeypatch=None):
    """Wrap the Triton RMSNorm launchers to count calls that take the fused residual path: forwards
    given a residual, backwards given the residual stream's own gradient. Returns the live counts."""
    import kernels.rms_norm as kr

    counts = {"forward": 0, "backward": 0}
    fwd, bwd = kr.rms_norm_forward, kr.rms_norm_backward

    def counted_forward(x, weight, eps, residual=None):
        counts["forward"] += residual is not None
        return fwd(x, weight, eps, residual)

    def counted_backward(dy, s, weight, rstd, ds=None):
        counts["backward"] += ds is not None
        return bwd(dy, s, weight, rstd, ds)

    for name, f in (("rms_norm_forward", counted_forward), ("rms_norm_backward", counted_backward)):
        if monkeypatch is not None:
            monkeypatch.setattr(kr, name, f)
        else:  # a spawned rank: the process ends with the test
            setattr(kr, name, f)
    return counts


def _model_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 97, (2, 8), generator=g), torch.randint(0, 97, (2, 8), generator=g)


def _tp_model_with_triton_kernels(world_size):
    """TP (sequence parallel, vocab 97 padded to 98) with kernels=triton: loss and each gradient
    shard with where it sits in the global tensor."""
    from engine.mesh import build_mesh
    from engine.tensor_parallel import parallelize, sync_tp_grads
    from models import Llama, ModelConfig, init_weights
    from models.shard import iter_params

    cfg = ModelConfig(**MODEL_CFG)
    mesh = build_mesh(tp=world_size)
    with torch.device("meta"):
        model = Llama(cfg, kernels="triton")
    parallelize(model, mesh, sequence_parallel=True)
    init_weights(model, seed=0, n_layers=cfg.n_layers, device="cpu")
    x, y = _model_batch()
    fused = count_fused_residual_norms()
    loss = model(x, y)
    loss.backward()
    sync_tp_grads([model], mesh)
    return loss.item(), {n: (p.grad[m.local_slices()].numpy(), m.global_slices(), m.global_shape)
                         for n, p, m in iter_params(model)}, dict(fused)


def _vocab_parallel_worker(rank, world_size):
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size)))
    results = {"tp_model": _tp_model_with_triton_kernels(world_size)}
    for dtype in DTYPES:
        full, targets = _vocab_full_problem(dtype)
        v_local = full.shape[-1] // world_size  # 45 ids per rank
        shard = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        for name, impl in (("triton", cross_entropy), ("reference", cross_entropy_reference)):
            loss = impl(shard * 1.0, targets, tp_group=group)
            (grad,) = torch.autograd.grad(loss, [shard])
            # numpy (bf16 -> fp32 is exact): torch tensors would travel through shared memory that this
            # process releases when it exits, possibly before the parent has read them
            results[dtype, name] = (loss.item(), grad.float().numpy(), grad.dtype)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank gloo world runs every tensor-parallel case (spawning is the slow part)."""
    return run_distributed(_vocab_parallel_worker, world_size=2)


def test_vocab_parallel_cross_entropy_equals_full_vocabulary(two_ranks):
    """Each of 2 gloo ranks holds half the vocabulary; loss and the concatenated gradient equal the
    full-vocabulary loss and gradient (also for the torch reference of the vocab-parallel loss)."""
    results = two_ranks
    for dtype in DTYPES:
        full, targets = _vocab_full_problem(dtype)
        full.requires_grad_()
        want_loss = F.cross_entropy(full.float().reshape(-1, 90), targets.reshape(-1))
        (want_grad,) = torch.autograd.grad(want_loss, [full])
        for name in ("triton", "reference"):
            for r in results:
                assert r[dtype, name][0] == pytest.approx(want_loss.item(), rel=1e-5) and r[dtype, name][2] == dtype
            grad = torch.cat([torch.from_numpy(r[dtype, name][1]) for r in results], dim=-1).to(dtype)
            assert_same([grad], [want_grad], dtype)


# ---- the model with kernels=triton -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_model_with_triton_kernels_equals_torch_kernels(dtype, monkeypatch):
    """Also: every block runs the fused residual RMSNorm kernel, forward and backward."""
    from models import Llama, ModelConfig, init_weights

    cfg = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=97, max_seq_len=16)
    x = torch.randint(0, cfg.vocab_size, (2, 9), device=DEVICE)
    y = torch.randint(0, cfg.vocab_size, (2, 9), device=DEVICE)
    results = []
    fused = count_fused_residual_norms(monkeypatch)
    for kernels in ("triton", "torch"):
        with torch.device("meta"):
            model = Llama(cfg, kernels=kernels)
        model = init_weights(model, seed=0, n_layers=cfg.n_layers, device=DEVICE).to(dtype)
        loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        if kernels == "triton":
            assert fused == {"forward": cfg.n_layers, "backward": cfg.n_layers}
    assert fused == {"forward": cfg.n_layers, "backward": cfg.n_layers}  # the torch path never launches
    (loss_t, grads_t), (loss_r, grads_r) = results
    assert loss_t.item() == pytest.approx(loss_r.item(), rel=1e-5 if dtype == torch.float32 else 1e-2)
    assert grads_t.keys() == grads_r.keys() and len(grads_t) == 2 * 9 + 3
    for name in grads_r:
        assert_same([grads_t[name]], [grads_r[name]], dtype)


def test_tensor_parallel_model_with_triton_kernels_equals_serial_torch_model(two_ranks):
    from models import Llama, ModelConfig, init_weights

    cfg = ModelConfig(**MODEL_CFG)
    with torch.device("meta"):
        serial = Llama(cfg, kernels="torch")
    init_weights(serial, seed=0, n_layers=cfg.n_layers, device="cpu")
    x, y = _model_batch()
    loss = serial(x, y)
    loss.backward()
    for rank_loss, _, fused in (r["tp_model"] for r in two_ranks):
        assert rank_loss == pytest.approx(loss.item(), rel=1e-5)
        # each rank fused the residual add into ffn_norm on its own sequence shard, in every block
        assert fused == {"forward": cfg.n_layers, "backward": cfg.n_layers}
    for name, p in serial.named_parameters():
        got = torch.full(p.shape, float("nan"))
        for _, grads, _ in (r["tp_model"] for r in two_ranks):
            local, where, global_shape = grads[name]
            assert tuple(global_shape) == tuple(p.shape), name
            got[where] = torch.from_numpy(local)
        assert not got.isnan().any(), f"{name}: the shards do not cover the global tensor"
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _unfused_block_forward(block, x):
    """The block as written before the fusion: the textbook pre-norm residual formula."""
    h = x + block.attention(block.attention_norm(x))
    return h + block.feed_forward(block.ffn_norm(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_block_equals_the_unfused_formula_on_the_torch_path(dtype):
    """kernels=torch: TransformerBlock (fused residual RMSNorm) is the old formula bit for bit,
    output and every gradient, so serial runs, checkpoints and the HF comparison are unchanged."""
    from models import Llama, ModelConfig, init_weights

    cfg = ModelConfig(**MODEL_CFG)
    with torch.device("meta"):
        model = Llama(cfg, kernels="torch")
    block = init_weights(model, seed=0, n_layers=cfg.n_layers, device=DEVICE).to(dtype).layers["1"]
    x = torch.randn(2, 9, cfg.dim, device=DEVICE).to(dtype)
    g = torch.randn(2, 9, cfg.dim, device=DEVICE).to(dtype)
    params = list(block.parameters())
    results = []
    for forward in (block, lambda t: _unfused_block_forward(block, t)):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        results.append((out, *torch.autograd.grad(out, [xi, *params], g)))
    for new, old in zip(*results, strict=True):
        assert torch.equal(new, old), (new - old).abs().max()


def test_fused_norm_promotes_a_bf16_sublayer_output_to_the_fp32_residual_stream():
    """Under CUDA autocast the attention output is bf16 and the residual stream float32: the fused
    path (Triton, which needs one dtype) must give what x + residual and the norm gave before."""
    from models.llama import RMSNorm

    norms = {k: RMSNorm(123, 1e-5, get_ops(k)).to(DEVICE) for k in ("triton", "torch")}
    for n in norms.values():
        with torch.no_grad():
            n.weight.copy_(torch.linspace(0.5, 1.5, 123))
    a = randn(5, 123, dtype=torch.bfloat16)
    r = randn(5, 123)
    for name, norm in norms.items():
        got_out, got_grad = fwd_bwd(lambda a, r: norm(a, residual=r), [a, r])
        want_out, want_grad = fwd_bwd(lambda a, r: (TORCH_OPS.rms_norm(r + a, norm.weight, 1e-5), r + a), [a, r])
        assert [o.dtype for o in got_out] == [torch.float32, torch.float32], name
        assert [t.dtype for t in got_grad] == [torch.bfloat16, torch.float32], name
        assert_same(got_out, want_out, torch.float32)
        assert_same(got_grad[:1], want_grad[:1], torch.bfloat16)  # near-equal fp32 grads, each rounded to bf16
        assert_same(got_grad[1:], want_grad[1:], torch.float32)


def test_get_ops_selects_the_triton_path():
    from kernels import triton_ops

    ops = get_ops("triton")
    # the block's three are triton_ops' dispatchers (the launchers, or their custom ops inside a compiled block)
    assert (ops.rms_norm, ops.swiglu, ops.apply_rotary) == (triton_ops.rms_norm, triton_ops.swiglu,
                                                            triton_ops.apply_rotary)
    assert ops.cross_entropy is cross_entropy
    assert get_ops("torch") is TORCH_OPS
    assert get_ops("auto") is (ops if torch.cuda.is_available() else TORCH_OPS)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, match", [
    (lambda: rms_norm(randn(4, 8), randn(7), 1e-5), ValueError, "does not match the last dim"),
    (lambda: rms_norm(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), randn(8), 1e-5), TypeError, "float32"),
    (lambda: rms_norm(randn(4, 8), randn(8), 1e-5, residual=randn(4, 8, dtype=torch.bfloat16)), ValueError,
     "residual"),
    (lambda: swiglu(randn(4, 8), randn(4, 9)), ValueError, "same shape"),
    (lambda: apply_rotary(randn(1, 3, 2, 5), *rope_cos_sin(3, 6, 1e4, device=DEVICE)), ValueError, "even"),
    (lambda: apply_rotary(randn(1, 3, 2, 6), *rope_cos_sin(4, 6, 1e4, device=DEVICE)), ValueError, "rope_cos_sin"),
    (lambda: apply_rotary(randn(3, 2, 6), *rope_cos_sin(3, 6, 1e4, device=DEVICE)), ValueError, "batch, seq"),
    (lambda: cross_entropy(randn(4, 9), torch.tensor([1.0, 2, 3, 4], device=DEVICE)), TypeError, "int64"),
    (lambda: cross_entropy(randn(4, 9), torch.tensor([1, 2, 3], device=DEVICE)), ValueError, "trailing vocabulary"),
    (lambda: cross_entropy(randn(4, 9), torch.tensor([1, 2, 9, -100], device=DEVICE), check_targets=True),
     ValueError, r"outside \[0, 9\).*vocab_size"),
    (lambda: cross_entropy_torch(randn(4, 9), torch.tensor([1, 2, -1, -100], device=DEVICE), check_targets=True),
     ValueError, r"outside \[0, 9\).*vocab_size"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch):
    import kernels._triton as kt

    monkeypatch.setattr(kt, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="kernels=torch"):
        swiglu(torch.ones(2, 3), torch.ones(2, 3))


def test_training_launch_with_triton_kernels_follows_the_torch_run(data_dir, tmp_path):
    """The `kernels=triton` config switch end to end: same losses as `kernels=torch` (AdamW steps)."""
    from tests.support.launch import SMALL_MODEL, assert_runs_match, train_in_process

    # one micro-batch of 2 x 16 tokens per step: the interpreter is slow
    small = [*SMALL_MODEL, "train.seq_len=16", "train.global_batch_size=2", "train.max_steps=2"]
    runs = {k: train_in_process([*small, f"data.dir={data_dir}", f"run_dir={tmp_path / k}", f"kernels={k}"])
            for k in ("triton", "torch")}
    assert len(runs["torch"]) == 2
    assert_runs_match(runs["triton"], runs["torch"], rel=1e-5, grad_norm_rel=1e-5, first_grad_norm_rel=None)
