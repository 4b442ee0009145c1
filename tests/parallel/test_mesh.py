import pytest
import torch.distributed as dist

from engine.mesh import build_mesh, resolve_dp
from tests.support.distributed import run_distributed


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


def test_two_local_ranks_on_one_gpu_is_a_launch_error(monkeypatch):
    import torch

    from engine.mesh import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default_device(1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 but only 2 CUDA device\(s\) are visible.*"
                                         r"--nproc-per-node 2"):
        default_device(2)


def test_fp32_grouped_query_attention_on_cuda_warns_naming_bf16():
    import torch

    from engine.trainer import precision_warnings
    from models import ModelConfig

    gqa, mha = ModelConfig(n_heads=6, n_kv_heads=2), ModelConfig(n_heads=6, n_kv_heads=6)
    (warning,) = precision_warnings("fp32", torch.device("cuda", 0), gqa)
    assert "math path" in warning and warning.endswith("use precision=bf16")
    assert precision_warnings("bf16", torch.device("cuda", 0), gqa) == []
    assert precision_warnings("fp32", torch.device("cuda", 0), mha) == []
    assert precision_warnings("fp32", torch.device("cpu"), gqa) == []
