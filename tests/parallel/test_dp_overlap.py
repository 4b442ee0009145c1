import pytest
import torch
import torch.distributed as dist

from engine.data_parallel import OverlappedGradReducer
from tests.support.distributed import run_distributed


def _reduce(rank, world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    params = list(model.parameters())
    reducer = OverlappedGradReducer(params, dist.group.WORLD, n_micro=3, bucket_bytes=64 * 64 * 4)
    torch.manual_seed(1 + rank)  # each rank sees different data
    xs = [torch.randn(5, 64) for _ in range(3)]
    for x in xs:
        model(x).square().sum().backward()
    launched = reducer.launched_during_backward
    reducer.finish()
    ref = [torch.zeros_like(p) for p in params]  # the plain all-reduced mean, for comparison
    for r in range(world):
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
        torch.manual_seed(1 + r)
        for x in [torch.randn(5, 64) for _ in range(3)]:
            m(x).square().sum().backward()
        for acc, p in zip(ref, m.parameters()):
            acc += p.grad / world
    return launched, max((p.grad - g).abs().max().item() for p, g in zip(params, ref))


def _world(rank, world):
    """The three cases in one 2-process world (a spawn costs ~10 s on this machine)."""
    return {"reduce": _reduce(rank, world), "persistent": _persistent(rank, world), "deferred": _deferred(rank, world)}


@pytest.fixture(scope="module")
def world():
    return run_distributed(_world, 2)


def test_overlapped_reduction_equals_the_mean_and_starts_during_backward(world):
    for launched, err in (r["reduce"] for r in world):
        assert err < 1e-5
        assert launched >= 4  # most buckets were sent while the last backward was still running


def _persistent(rank, world):
    """Two steps with an optimizer's ``grad = None`` between them: every gradient is a view into its
    bucket's flat buffer in both, and the second step's average is of the second step's gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    params = list(model.parameters())
    reducer = OverlappedGradReducer(params, dist.group.WORLD, n_micro=2, bucket_bytes=16 * 16 * 4)
    out = []
    for step in range(2):
        for mb in range(2):
            torch.manual_seed(100 * step + 10 * rank + mb)
            model(torch.randn(4, 16)).square().sum().backward()
        reducer.finish()
        in_bucket = all(p.grad.untyped_storage().data_ptr()
                        == reducer.flats[reducer.bucket_of[id(p)]].untyped_storage().data_ptr() for p in params)
        out.append((in_bucket, [p.grad.tolist() for p in params]))  # plain lists: tensors do not cross processes
        for p in params:
            p.grad = None
        reducer.zero_grad()
    return out


def test_gradients_live_in_persistent_buckets_across_steps(world):
    results = [r["persistent"] for r in world]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    for step in range(2):
        model.zero_grad(set_to_none=True)
        for rank in range(2):
            for mb in range(2):
                torch.manual_seed(100 * step + 10 * rank + mb)
                (model(torch.randn(4, 16)).square().sum() / 2).backward()
        for in_bucket, grads in (r[step] for r in results):
            assert in_bucket
            for g, p in zip(grads, model.parameters()):
                torch.testing.assert_close(torch.tensor(g), p.grad, rtol=1e-5, atol=1e-6)


def _deferred(rank, world):
    """Zero-bubble weights: I leaves their gradients to W; each W's gradient is reported to the
    reducer (`WeightGradStore.on_grad`), so a bucket goes out as soon as its last W has run."""
    from engine.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral
    from models.llama import Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Linear(32, 32, bias=False) for _ in range(4)])
    ref_model = torch.nn.Sequential(*[torch.nn.Linear(32, 32, bias=False) for _ in range(4)])
    ref_model.load_state_dict(model.state_dict())
    store = WeightGradStore()
    enable_weight_grad_deferral([model], store)
    params = list(model.parameters())
    reducer = OverlappedGradReducer(params, dist.group.WORLD, n_micro=2, bucket_bytes=32 * 32 * 4)
    store.on_grad.append(reducer.on_deferred_grad)
    for mb in range(2):
        torch.manual_seed(1 + 10 * rank + mb)
        x = torch.randn(5, 32, requires_grad=True)
        with store.capture((mb, 0)):
            model(x).square().sum().backward()
    untouched = all(float(p.grad.abs().sum()) == 0.0 for p in params)   # I computed no weight gradient
    after_i = reducer.launched_during_backward
    store.flush((0, 0))
    after_first_w = reducer.launched_during_backward
    store.flush((1, 0))
    after_last_w = reducer.launched_during_backward
    reducer.finish()
    ref = [torch.zeros_like(p) for p in params]
    for r in range(world):
        ref_model.zero_grad()
        for mb in range(2):
            torch.manual_seed(1 + 10 * r + mb)
            ref_model(torch.randn(5, 32)).square().sum().backward()
        for acc, p in zip(ref, ref_model.parameters()):
            acc += p.grad / world
    return (untouched, after_i, after_first_w, after_last_w,
            max((p.grad - g).abs().max().item() for p, g in zip(params, ref)))


def test_deferred_weight_gradients_reach_the_reducer_as_their_w_runs(world):
    for untouched, after_i, after_first_w, after_last_w, err in (r["deferred"] for r in world):
        assert untouched and after_i == 0 and after_first_w == 0
        assert after_last_w == 4   # every one-weight bucket sent by its last W, before finish()
        assert err < 1e-5
