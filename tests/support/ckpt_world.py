"""Checkpoint saves in a gloo world (for `run_distributed`), with a fault injected on one rank.
Kept apart from the test modules so a spawned rank imports only torch and the engine."""
import errno


def save_twice_second_fails_on_rank(rank, world, root, failing_rank) -> str:
    """Save step 1 on every rank, then step 2 with ``failing_rank``'s write failing (disk full).
    Returns the message every rank raised for step 2."""
    import torch

    from engine import checkpoint as ckpt
    from engine.checkpoint_saver import Checkpointer
    from models.shard import ShardMeta

    full = torch.arange(12.0).reshape(4, 3)
    meta = ShardMeta(global_shape=(4, 3), offset=(2 * rank, 0), shape=(2, 3))  # each rank holds two rows
    entries = [ckpt.Entry("model/w", full[2 * rank:2 * rank + 2].clone(), meta)]
    saver = Checkpointer(root, keep_last=2)
    saver.save(1, entries, model_config={}, layout={"dp": world}, train_state={"step": 1})
    if rank == failing_rank:
        def disk_full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        ckpt.save_file = disk_full
    try:
        saver.save(2, entries, model_config={}, layout={"dp": world}, train_state={"step": 2})
    except ckpt.SaveFailed as e:
        return str(e)
    raise AssertionError("the save of step 2 did not fail")
