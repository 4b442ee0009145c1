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
