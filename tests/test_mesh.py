import pytest
import torch.distributed as dist

from engine.mesh import build_mesh, resolve_dp
from tests.distributed import run_distributed


def _coords(rank, world, tp, pp):
    mesh = build_mesh(tp=tp, pp=pp)
    return (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank, dist.get_world_size(mesh.tp_group),
            dist.get_world_size(mesh.dp_group), mesh.pp_global_rank((mesh.pp_rank + 1) % mesh.pp))


def test_mesh_is_tp_innermost_pp_outermost():
    out = run_distributed(_coords, 4, args=(2, 2))  # pp=2, dp=1, tp=2
    assert [o[:3] for o in out] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    assert all(o[3] == 2 and o[4] == 1 for o in out)
    assert [o[5] for o in out] == [2, 3, 0, 1]  # the next pipeline stage with the same tp rank


def test_world_not_tiled_by_the_mesh_names_all_three():
    with pytest.raises(ValueError, match=r"parallel.tp=2 × parallel.pp=2 × parallel.dp=2 = 8 .* world size 6"):
        resolve_dp(6, tp=2, pp=2, dp=2)
    with pytest.raises(ValueError, match="not divisible by parallel.tp=4"):
        resolve_dp(6, tp=4, pp=1, dp=None)
    assert resolve_dp(8, tp=2, pp=2, dp=None) == 2
