"""The validator: a proof that a set of action lists can run, and the lists a launch runs.

`validate_schedule` proves the lists complete, ordered by their dependencies, consistently
ordered per rank pair and deadlock-free, by running them through `run_batches` with ordered
matching and *rendezvous* semantics (a send finishes only once its receive is posted, and a batch
only once all its operations are matched, as an NCCL group kernel on one stream does), which is
stricter than what the gloo runtime needs. `build_step_actions` builds, lowers and proves a
launch's lists once; the trainer hands them to the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from engine.layout import rank_stages, stage_rank
from engine.pipeline.actions import FORWARD_ONLY, Action, Kind, backward_kind, deps, split_backwards
from engine.pipeline.generators import build_forward_only, build_schedule, schedule_placement
from engine.pipeline.lowering import p2p_streams
from engine.pipeline.simulate import run_batches


def validate_schedule(actions: Sequence[Sequence[Action]], pp: int, n_micro: int, virtual_stages: int = 1,
                      placement: str = "loop") -> None:
    """Raise ValueError unless the lists are complete, ordered by their dependencies and deadlock-free.

    Complete: every (stage, micro-batch) is forwarded once and backwarded once (B, or I then W) on
    the rank that owns the stage under `placement` (`engine.layout.stage_rank`); every cross-rank
    tensor has exactly one send and one receive.
    Ordered: on each rank a receive precedes the compute that consumes it, a send follows the
    compute that produces it, and same-rank dependencies come in order.
    Consistently ordered: for every ordered rank pair the receives come in the order of the sends
    (`check_p2p_order`), so matching by posting order, as NCCL and the tag-0 runtime do, pairs
    every receive with the message it names.
    Deadlock-free: `run_batches` completes under rendezvous semantics with ordered matching.
    """
    n_stages = pp * virtual_stages
    seen = _check_placement(actions, pp, n_micro, n_stages, placement)
    split = split_backwards(actions)
    both = sorted(f"{s}B{mb}" for s, mb in split if Action(s, Kind.B, mb) in seen)
    if both:
        raise ValueError(f"{', '.join(both[:8])}: a backward is either one B or an I and a W, not both")
    missing = [str(Action(s, k, mb)) for s in range(n_stages) for mb in range(n_micro)
               for k in ((Kind.F, Kind.I, Kind.W) if (s, mb) in split else (Kind.F, Kind.B))
               if Action(s, k, mb) not in seen]
    if missing:
        raise ValueError(f"incomplete schedule: missing {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for a in seen:
        if a.is_p2p and a.partner() not in seen:
            raise ValueError(f"{a} on rank {seen[a]} has no matching {a.partner()} on rank "
                             f"{stage_rank(a.peer_stage, pp, placement)}")
    for r, acts in enumerate(actions):
        pos = {a: i for i, a in enumerate(acts)}
        for a in acts:
            if a.is_p2p:
                continue
            for d in deps(a, n_stages, split):
                if stage_rank(d.stage, pp, placement) == r:
                    if pos[d] > pos[a]:
                        raise ValueError(f"rank {r}: {a} runs before {d}, which it needs")
                else:
                    recv = Action(a.stage, Kind.RF if a.kind == Kind.F else Kind.RB, a.mb)
                    if recv not in pos or pos[recv] > pos[a]:
                        raise ValueError(f"rank {r}: {a} needs {recv} before it")
        for a in acts:
            if a.kind.is_send:
                producer = Action(a.stage, Kind.F if a.kind == Kind.SF else backward_kind(split, a.stage, a.mb), a.mb)
                if pos[producer] > pos[a]:
                    raise ValueError(f"rank {r}: {a} is sent before {producer} computes it")
    check_p2p_order(actions, pp)
    run_batches(actions, pp, lambda r, a: 1.0, 0.0)


def _check_placement(actions: Sequence[Sequence[Action]], pp: int, n_micro: int, n_stages: int,
                     placement: str) -> dict[Action, int]:
    """Every action in range, on the rank owning its stage, once; returns action -> rank."""
    if len(actions) != pp:
        raise ValueError(f"expected {pp} action lists (one per pp rank), got {len(actions)}")
    seen: dict[Action, int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if not 0 <= a.stage < n_stages or not 0 <= a.mb < n_micro:
                raise ValueError(f"rank {r}: {a} is outside stages 0..{n_stages - 1} / micro-batches 0..{n_micro - 1}")
            owner = stage_rank(a.stage, pp, placement)
            if owner != r:
                raise ValueError(f"rank {r}: {a} acts on stage {a.stage}, which lives on rank {owner} "
                                 f"({placement} placement)")
            if a.is_p2p and stage_rank(a.peer_stage, pp, placement) == r:
                raise ValueError(f"rank {r}: {a} sends to its own rank; same-rank stages hand over in memory")
            if a in seen:
                raise ValueError(f"rank {r}: {a} appears twice")
            seen[a] = r
    return seen


def _describe(send: Action) -> str:
    direction = "activation" if send.kind == Kind.SF else "input gradient"
    return f"{send} (micro-batch {send.mb}, {direction} from stage {send.stage} to stage {send.peer_stage})"


def check_p2p_order(actions: Sequence[Sequence[Action]], pp: int) -> None:
    """Raise ValueError unless, for every ordered rank pair (src -> dst), the k-th send src posts to
    dst is the message of the k-th receive dst posts from src (same micro-batch, sending stage and
    direction). NCCL ignores tags and matches a pair's messages in posting order, and the runtime
    posts every message with tag 0, so this is what makes each receive get the tensor it expects."""
    for (src, dst), (sends, recvs) in sorted(p2p_streams(actions, pp).items()):
        for k in range(max(len(sends), len(recvs))):
            send = sends[k] if k < len(sends) else None
            recv = recvs[k] if k < len(recvs) else None
            if send is not None and recv is not None and recv.partner() == send:
                continue
            posted = f"rank {src} posts {_describe(send)}" if send else f"rank {src} posts no send"
            wanted = (f"rank {dst} posts {recv}, which expects {_describe(recv.partner())}" if recv
                      else f"rank {dst} posts no receive")
            raise ValueError(f"p2p order mismatch from rank {src} to rank {dst} at message {k}: {posted}, but "
                             f"{wanted}. NCCL matches a rank pair's messages in posting order (tags are "
                             f"ignored), so the receive order must equal the send order")


@dataclass(frozen=True)
class StepActions:
    """Every pp rank's proven action lists for one launch: `train` for a training step, `forward`
    (gpipe's forward half on the same placement) for evaluation. `placement` says which rank holds
    which stage (`engine.layout.stage_rank`)."""
    schedule: str
    pp: int
    n_micro: int
    virtual_stages: int
    train: list[list[Action]]
    forward: list[list[Action]]
    placement: str = "loop"

    def stages(self, rank: int) -> list[int]:
        """The global stages pp rank ``rank`` holds, in local chunk order."""
        return rank_stages(rank, self.pp, self.virtual_stages, self.placement)


def build_step_actions(schedule: str, pp: int, n_micro: int, virtual_stages: int = 1) -> StepActions:
    """Check the arguments, build and lower the schedule, and prove both list sets; ValueError names
    what is wrong. The forward-only lists are gpipe's minus its backward messages (the same filter
    on both ends of every pair), proven in order and deadlock-free here all the same."""
    placement = schedule_placement(schedule)
    train = build_schedule(schedule, pp, n_micro, virtual_stages)
    validate_schedule(train, pp, n_micro, virtual_stages, placement)
    forward = build_forward_only(schedule, pp, n_micro, virtual_stages)
    check_p2p_order(forward, pp)
    run_batches(forward, pp, lambda r, a: 1.0, 0.0)
    return StepActions(schedule, pp, n_micro, virtual_stages, train, forward, placement)
