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


def test_overlapped_reduction_equals_the_mean_and_starts_during_backward():
    for launched, err in run_distributed(_reduce, 2):
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


def test_gradients_live_in_persistent_buckets_across_steps():
    results = run_distributed(_persistent, 2)
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
