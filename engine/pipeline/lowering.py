"""P2p lowering: from per-rank compute orders to the lists the runtime executes.

`place_p2p` inserts the sends right after their producer and each receive at the point its rank
reaches when the send is posted in a unit-cost timeline, so every rank blocks as little as the
schedule allows; `hoist_receives` then posts receives up to one compute earlier where that is
proven safe and useful, so transfers overlap compute. Consecutive p2p actions form one batch (`p2p_batches`) that the runtime posts
with a single `batch_isend_irecv` and then waits on. Messages carry no tags (NCCL ignores them):
a rank pair's messages are matched in posting order (`p2p_streams` lists them per ordered pair),
which `engine.pipeline.validate.check_p2p_order` proves consistent.
"""
from __future__ import annotations

import bisect

from bisect import bisect_left
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


def place_p2p(order: list[list[Action]], n_stages: int, *, early_recv: int = 1) -> list[list[Action]]:
    """Insert SF/RF/SB/RB between each rank's compute actions (see the module docstring), then
    post receives earlier where that is proven safe, at most `early_recv` compute actions before
    their consumer (`hoist_receives`; 0 keeps the unit-timeline placement)."""
    lists = _place_on_unit_timeline(order, n_stages)
    return hoist_receives(lists, early_recv) if early_recv > 0 else lists


def _place_on_unit_timeline(order: list[list[Action]], n_stages: int) -> list[list[Action]]:
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
        # (a rank's start times never decrease along its list, so a binary search finds it)
        j = min(bisect.bisect_left(starts[rc], t_send, 0, ic), ic)
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


def hoist_receives(lists: list[list[Action]], window: int = 1) -> list[list[Action]]:
    """Post every receive as early as proven safe, but at most `window` compute actions before the
    compute that consumes it, so its transfer overlaps the compute(s) in between.

    Safe means the NCCL contract the validator proves still holds. Order: a receive never passes
    an earlier receive from the same peer, so every rank pair's receives stay in its sends' order
    (`check_p2p_order`). Deadlock freedom under rendezvous semantics (a rank blocks at a batch
    until every partner batch has been reached, as an NCCL group on one stream does): the lists
    are a dependency graph, compute → next item on the rank, and the compute before a batch →
    every partner batch; they run iff it has no cycle. Moving a receive whose message is produced
    by compute P into the batch before compute c of its own rank adds one edge, P → that batch
    (→ c), and only weakens the sender's (it now waits for an earlier point here). So it is safe
    alone iff P does not depend on c or any later compute of the rank, i.e. c > dep(P)[rank],
    where dep(u)[r] is the last compute of rank r that u transitively waits for. Moves onto one
    rank are safe together: a cycle through several new edges c_i ← P_i would need each c_i's
    successor P_j to depend on c_i, so c_i ≤ dep(P_j)[rank] < c_j all the way round, impossible.
    So the ranks are done one after another, each against the dependencies of the lists as the
    previous ones left them. A stage's rank is where its actions are, never stage % pp."""
    # work on integer ids: the actions, their partners and consumers do not change, only places
    acts = [a for rank_acts in lists for a in rank_acts]
    ident = {a: i for i, a in enumerate(acts)}
    compute = [a.is_compute for a in acts]
    partner = [ident.get(a.partner(), -1) if a.is_p2p else -1 for a in acts]
    consumer = [-1] * len(acts)
    for i, a in enumerate(acts):
        if a.kind.is_recv:
            uses = (Kind.F,) if a.kind == Kind.RF else (Kind.I, Kind.B)
            consumer[i] = next((ident[c] for c in (Action(a.stage, k, a.mb) for k in uses) if c in ident), -1)
    # when each compute ends on the placement's unit timeline
    order = [[a for a in rank_acts if a.is_compute] for rank_acts in lists]
    times = _unit_timeline(order, 1 + max((a.stage for a in acts), default=0))
    ends = [times[a][1] if a.is_compute else 0.0 for a in acts]
    ids = [[ident[a] for a in rank_acts] for rank_acts in lists]
    for rank_ids in ids:            # a send is posted when the compute before it (its producer) ends
        last = -1
        for i in rank_ids:
            if compute[i]:
                last = i
            else:
                ends[i] = ends[last] if last >= 0 else 0.0
    for r in range(len(ids)):
        if _may_move(ids[r], window, compute, partner, consumer, ends):
            ids[r] = _hoist_rank(ids, r, window, compute, partner, consumer, ends)
    return [[acts[i] for i in rank_ids] for rank_ids in ids]


def _may_move(rank_ids: list[int], window: int, compute: list[bool], partner: list[int], consumer: list[int],
              ends: list[float]) -> bool:
    """Whether any receive of the rank passes `_hoist_rank`'s tests that need no dependencies (it
    leads its batch, and the window and the send's time allow an earlier place): else skip it."""
    index = {i: n for n, i in enumerate(i for i in rank_ids if compute[i])}
    my_ends = [ends[i] for i in rank_ids if compute[i]]
    n, lead = 0, True
    for i in rank_ids:
        if compute[i]:
            n, lead = n + 1, True
            continue
        if lead and consumer[i] >= 0 and partner[i] >= 0 and \
                max(index[consumer[i]] - window, bisect_left(my_ends, ends[partner[i]])) < n:
            return True
        lead = False
    return False


def _batches(ids: list[int], compute: list[bool]) -> list:
    """A rank's ids grouped as `p2p_batches` does: a compute id alone, consecutive p2p ids as a tuple."""
    out: list = []
    run: list[int] = []
    for i in ids:
        if compute[i]:
            if run:
                out.append(tuple(run))
                run = []
            out.append(i)
        else:
            run.append(i)
    if run:
        out.append(tuple(run))
    return out


def _dependencies(ids: list[list[int]], compute: list[bool], partner: list[int]):
    """The rank lists as batches, where each p2p id sits (rank, item), and for every compute item
    its dependency vector dep[r][k]: per rank, the number of the last compute of that rank it
    transitively waits for under rendezvous semantics (-1: none). Found in one run of the lists in
    dependency order, which also proves they do not deadlock."""
    items = [_batches(rank_ids, compute) for rank_ids in ids]
    home = {}
    for r, its in enumerate(items):
        for k, it in enumerate(its):
            if isinstance(it, tuple):
                for i in it:
                    home[i] = (r, k)
    n = len(items)
    none = (-1,) * n
    dep: list[list[tuple[int, ...]]] = [[none] * len(its) for its in items]
    number = [[0] * len(its) for its in items]     # compute number of each compute item
    after = [none] * n      # per rank: what everything done so far on it depends on, itself included
    done = [0] * n          # computes completed per rank
    reached: set[tuple[int, int]] = set()
    pos = [0] * n
    progressed = True
    while progressed:
        progressed = False
        for r, its in enumerate(items):
            while pos[r] < len(its):
                k = pos[r]
                it = its[k]
                if not isinstance(it, tuple):
                    dep[r][k] = after[r]
                    number[r][k] = done[r]
                    after[r] = after[r][:r] + (done[r],) + after[r][r + 1:]
                    done[r] += 1
                else:
                    reached.add((r, k))
                    partners = [home.get(partner[i]) for i in it]
                    if any(p not in reached for p in partners):
                        break
                    vec = after[r]
                    for q, kq in partners:      # the partner batch was reached: its rank had done all before it
                        if kq > 0:              # batches never touch, so item kq - 1 is a compute
                            d = dep[q][kq - 1]
                            vec = tuple(map(max, vec, d[:q] + (number[q][kq - 1],) + d[q + 1:]))
                    after[r] = vec
                pos[r] += 1
                progressed = True
    stuck = [r for r, its in enumerate(items) if pos[r] < len(its)]
    if stuck:
        raise ValueError(f"p2p lists deadlock: ranks {stuck} wait on each other")
    return items, home, dep


def _hoist_rank(ids: list[list[int]], r: int, window: int, compute: list[bool], partner: list[int],
                consumer: list[int], ends: list[float]) -> list[int]:
    """Rank r's ids with its receives moved as `hoist_receives` allows, against `ids`' dependencies."""
    items, home, dep = _dependencies(ids, compute, partner)
    its = items[r]
    computes = [k for k, it in enumerate(its) if not isinstance(it, tuple)]
    index = {its[k]: n for n, k in enumerate(computes)}
    my_ends = [ends[its[k]] for k in computes]
    slots: list[list[int]] = [[] for _ in range(len(computes) + 1)]   # slot n: the batch before compute n
    last_from: dict[int, int] = {}      # sender rank -> slot of its latest receive here
    n = 0
    for it in its:
        if not isinstance(it, tuple):
            n += 1
            continue
        for i in it:
            target = n
            if consumer[i] >= 0 and partner[i] >= 0:        # a receive (with its send and consumer)
                q, kq = home[partner[i]]
                # item kq - 1 is the send's producer: its dependencies bound what is safe, and when it
                # ends on the unit timeline bounds what helps (the transfer overlaps the compute)
                safe = dep[q][kq - 1][r] + 1 if kq > 0 else 0
                t_send = ends[partner[i]]
                need = index[consumer[i]]
                target = max(need - window, last_from.get(q, 0), safe, bisect_left(my_ends, t_send))
                # a batch waiting for a late partner holds up the rank's later batches (one NCCL
                # stream runs them in order): leave no p2p placed so far between the new place and
                # the old one
                target = max([target] + [t for t in range(target + 1, n + 1) if slots[t]])
                # one batch is one coalesced Work: never join a batch whose receives are needed sooner
                while target < n and any(consumer[j] >= 0 and index[consumer[j]] < need for j in slots[target]):
                    target += 1
                target = min(n, target)
                last_from[q] = target
            slots[target].append(i)
    seq: list[int] = []
    for n, k in enumerate(computes):
        seq += slots[n]
        seq.append(its[k])
    return seq + slots[len(computes)]


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
