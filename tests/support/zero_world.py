"""The real trainer run several times in one gloo world, reporting what a ZeRO test needs: the
records, rank 0's printed launch memory report, and the bytes of the tensors each rank really holds
(kept apart from the test module so that a spawned rank imports only torch and the engine)."""


def held_bytes(trainer) -> dict[str, int]:
    """Bytes of the distinct storages behind this rank's parameters, gradients (the parameters' and
    those of the tensors AdamW steps), optimizer master tensors (the ones AdamW steps that are not
    the parameters' own storage), optimizer state and module buffers: walked from the live objects,
    not from the layout rules."""
    import torch

    def storages(tensors) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    refs, opt = trainer.refs, trainer.optimizer.inner
    params = storages(r.param for r in refs)
    stepped = storages(p for g in opt.param_groups for p in g["params"])
    held = {"parameters": params,
            "gradients": storages([*(r.param.grad for r in refs if r.param.grad is not None),
                                   *(p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None)]),
            "master_weights": {k: v for k, v in stepped.items() if k not in params},
            "moments": storages(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
            "buffers": storages(b for c in trainer.chunks for b in c.buffers())}
    out = {k: sum(v.values()) for k, v in held.items()}
    out["total"] = sum(out.values())
    return out


def run_measured(rank, world, runs: dict[str, list[str]]) -> dict[str, dict]:
    """For each composed override list, in order: train, then return the records, the launch report
    rank 0 printed (None elsewhere), `held_bytes` after the last step, the parameter dtypes, and how
    many gradient buckets were sent while backward was still running. With ZeRO-2's separate fp32
    master (bf16 parameters), also ``master_init_diff``: the largest difference at launch between the
    master pieces and the fp32 initialization, rebuilt here from the same seed."""
    import contextlib
    import io

    import torch.distributed as dist

    from engine.trainer import Trainer
    from tests.support.launch import compose

    out = {}
    for name, overrides in runs.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            trainer = Trainer(compose(overrides))
        try:
            init_diff = _master_init_diff(trainer) if getattr(trainer.optimizer, "separate_master", False) else None
            records = trainer.run()
            out[name] = {"records": records, "printed": printed.getvalue() if rank == 0 else None,
                         "held": held_bytes(trainer), "param_dtypes": sorted({str(r.param.dtype) for r in trainer.refs}),
                         "overlapped": trainer.dp_reducer.launched_during_backward, "master_init_diff": init_diff}
            dist.barrier()
        finally:
            trainer.close()
    return out


def _master_init_diff(trainer) -> float:
    from engine.trainer import build_chunks

    fresh = [p for c in build_chunks(trainer.cfg, trainer.mcfg, trainer.mesh) for p in c.parameters()]
    assert len(fresh) == len(trainer.refs)
    by_param = {id(r.param): f for r, f in zip(trainer.refs, fresh)}
    opt = trainer.optimizer
    return max(((m - by_param[id(pc.ref.param)].detach().reshape(-1)[pc.start:pc.stop]).abs().max().item()
                for pc, m in zip(opt.pieces, opt.master_pieces)), default=0.0)
