"""P2p lowering: from per-rank compute orders to the lists the runtime executes.

`place_p2p` inserts the sends right after their producer and each receive at the point its rank
reaches when the send is posted in a unit-cost timeline, so every rank blocks as little as the
schedule allows. Consecutive p2p actions form one batch (`p2p_batches`) that the runtime posts
with a single `batch_isend_irecv` and then waits on. Messages carry no tags (NCCL ignores them):
a rank pair's messages are matched in posting order (`p2p_streams` lists them per ordered pair),
which `engine.pipeline.validate.check_p2p_order` proves consistent.
"""
from __future__ import annotations

from typing import Sequence

from engine.pipeline.actions import Action, Kind, backward_kind, deps, split_backwards

_UNIT_COST = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}


def _unit_timeline(order: list[list[Action]], n_stages: int) -> dict[Action, tuple[float, float]]:
    """(start, end) of every compute action, unit costs F=I=W=1, B=2, no communication cost: the
    placement's model of when a send is posted (the simulator runs the lowered lists instead)."""
    split = split_backwards(order)
    times: dict[Action, tuple[float, float]] = {}
    pos, clock = [0] * len(order), [0.0] * len(order)
    progressed = True
    while progressed:
        progressed = False
        for r, acts in enumerate(order):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                needs = deps(a, n_stages, split)
                if any(d not in times for d in needs):
                    break
                start = max([clock[r]] + [times[d][1] for d in needs])
                times[a] = (start, start + _UNIT_COST[a.kind])
                clock[r] = start + _UNIT_COST[a.kind]
                pos[r] += 1
                progressed = True
    stuck = [str(acts[pos[r]]) for r, acts in enumerate(order) if pos[r] < len(acts)]
    if stuck:
        raise ValueError(f"compute order cannot run: ranks wait on each other at {stuck}")
    return times


def place_p2p(order: list[list[Action]], n_stages: int) -> list[list[Action]]:
    """Insert SF/RF/SB/RB between each rank's compute actions (see the module docstring)."""
    times = _unit_timeline(order, n_stages)
    split = split_backwards(order)
    # sends_after[r][i]: sends right after compute i; recvs_before[r][j]: receives before compute j
    sends_after = [[[] for _ in acts] for acts in order]
    recvs_before = [[[] for _ in range(len(acts) + 1)] for acts in order]
    index = {a: (r, i) for r, acts in enumerate(order) for i, a in enumerate(acts)}
    starts = [[times[a][0] for a in acts] for acts in order]
    sent_at: dict[Action, tuple[float, int, int]] = {}     # receive -> (send time, sender rank, position)
    for a, (r, i) in index.items():
        if a.kind == Kind.F and a.stage < n_stages - 1:
            msg, consumer = Action(a.stage, Kind.SF, a.mb), Action(a.stage + 1, Kind.F, a.mb)
        elif a.kind in (Kind.B, Kind.I) and a.stage > 0:
            msg = Action(a.stage, Kind.SB, a.mb)
            consumer = Action(a.stage - 1, backward_kind(split, a.stage - 1, a.mb), a.mb)
        else:
            continue
        rc, ic = index[consumer]
        if rc == r:
            continue        # same rank (pp == 1): the tensor is handed over in memory
        t_send = times[a][1]
        # the receiver posts at the first point whose next compute starts at/after the send
        j = next(j for j in range(ic + 1) if j == ic or starts[rc][j] >= t_send)
        sends_after[r][i].append(msg)
        recvs_before[rc][j].append(msg.partner())
        sent_at[msg.partner()] = (t_send, r, i)

    def key(a: Action):
        # sends first; receives in the order their sends are posted (send time, then the sender's
        # list position), so every rank pair's receives come in its sends' order (NCCL matches
        # by order). Placement is monotone in the send time, so this holds across batches too.
        return (not a.kind.is_send,) + (sent_at[a] if a.kind.is_recv else ()) + (a.kind, a.stage, a.mb)

    out = []
    for r, acts in enumerate(order):
        seq: list[Action] = []
        pending: list[Action] = []
        for i, a in enumerate(acts):
            pending += recvs_before[r][i]
            seq += sorted(pending, key=key)
            seq.append(a)
            pending = list(sends_after[r][i])
        seq += sorted(pending + recvs_before[r][len(acts)], key=key)
        out.append(seq)
    return out


def p2p_batches(actions: Sequence[Action]) -> list[list[Action] | Action]:
    """Group a rank's list: each compute action alone, consecutive p2p actions into one batch."""
    out: list = []
    for a in actions:
        if a.is_p2p:
            if out and isinstance(out[-1], list):
                out[-1].append(a)
            else:
                out.append([a])
        else:
            out.append(a)
    return out


def p2p_streams(actions: Sequence[Sequence[Action]], pp: int) -> dict[tuple[int, int], tuple[list[Action], list[Action]]]:
    """For every ordered rank pair (src, dst) that exchanges messages: the sends src posts to dst
    and the receives dst posts from src, each in posting (list) order."""
    owner = stage_owners(actions)
    streams: dict[tuple[int, int], tuple[list[Action], list[Action]]] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if a.kind.is_send:
                streams.setdefault((r, owner.get(a.peer_stage, -1)), ([], []))[0].append(a)
            elif a.kind.is_recv:
                streams.setdefault((owner.get(a.peer_stage, -1), r), ([], []))[1].append(a)
    return streams


def stage_owners(actions: Sequence[Sequence[Action]]) -> dict[int, int]:
    """stage -> the rank whose list computes it: read from the lists, so the same code serves every
    placement (round robin or V); a stage no list computes has no owner (-1 in `p2p_streams`, which
    the validator reports as an unmatched message)."""
    return {a.stage: r for r, acts in enumerate(actions) for a in acts if a.is_compute}
