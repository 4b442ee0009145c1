"""Pipeline schedules as data: one ordered action list per pipeline rank.

A schedule is a pure function of (name, pp, micro-batches m, virtual stages v). The model is cut
into S = pp * v *stages* (global virtual-stage index s = 0..S-1); stage s lives on rank s % pp as
that rank's local chunk s // pp (round-robin placement, Narayanan et al. 2021,
https://arxiv.org/abs/2104.04473). Each rank's list holds:

  compute  F (forward), B (full backward), or for zero-bubble schedules I (backward for the input)
           and W (backward for the weights) as separate actions (Qi et al. 2023,
           https://arxiv.org/abs/2401.10241);
  p2p      SF / RF (send / receive a stage's output activation), SB / RB (send / receive the
           gradient of a stage's input). `stage` is always a stage owned by the acting rank:
           SF(mb, s) pairs with RF(mb, s + 1), SB(mb, s) pairs with RB(mb, s - 1).

Consecutive p2p actions form one batch that the runtime posts with a single
`batch_isend_irecv` and then waits on. Messages carry no tags (NCCL ignores them): a rank pair's
messages are matched in posting order, so for every ordered pair (src -> dst) the receives dst
posts from src must name, one for one, the sends src posts to dst (`check_p2p_order`).
`validate_schedule` proves a set of lists complete, consistently ordered and deadlock-free by
simulating exactly that, matching in order, with *rendezvous* semantics (a send finishes only
once its receive is posted, and a batch only once all its operations are matched, as an NCCL
group kernel on one stream does), which is stricter than what the gloo runtime needs.

Generators only choose the order of compute actions; `_place_p2p` then inserts the sends right
after their producer and each receive at the point its rank reaches when the send is posted in a
unit-cost timeline, so every rank blocks as little as the schedule allows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

COMPUTE = ("F", "B", "I", "W")
P2P = ("SF", "RF", "SB", "RB")


@dataclass(frozen=True, order=True)
class Action:
    """One step of one rank: `kind` in COMPUTE or P2P, micro-batch `mb`, global virtual `stage`."""
    kind: str
    mb: int
    stage: int

    def __post_init__(self):
        if self.kind not in COMPUTE + P2P:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {COMPUTE + P2P}")

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}c{self.stage}"

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    @property
    def is_p2p(self) -> bool:
        return self.kind in P2P

    @property
    def peer_stage(self) -> int:
        """The stage on the other end of a p2p action."""
        return {"SF": self.stage + 1, "RF": self.stage - 1, "SB": self.stage - 1, "RB": self.stage + 1}[self.kind]

    def partner(self) -> "Action":
        """The matching p2p action on the peer rank."""
        kind = {"SF": "RF", "RF": "SF", "SB": "RB", "RB": "SB"}[self.kind]
        return Action(kind, self.mb, self.peer_stage)


def parse_action(text: str) -> Action:
    """Inverse of str(Action): "F3c1" -> Action("F", 3, 1)."""
    match = re.fullmatch(r"([A-Z]+)(\d+)c(\d+)", text)
    if not match:
        raise ValueError(f"cannot parse action {text!r}; expected e.g. 'F3c1'")
    return Action(match[1], int(match[2]), int(match[3]))


def format_actions(actions: Sequence[Sequence[Action]], *, compute_only: bool = False) -> str:
    """One line per rank, e.g. "rank 0: F0c0 SF0c0 F1c0 ...", for humans and test failures."""
    lines = []
    for r, acts in enumerate(actions):
        shown = [a for a in acts if a.is_compute or not compute_only]
        lines.append(f"rank {r}: " + " ".join(str(a) for a in shown))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compute orders

def _gpipe(pp: int, m: int, v: int) -> list[list[Action]]:
    """All forwards (chunk by chunk), then all backwards in reverse chunk order. Holds m micro-batches."""
    out = []
    for r in range(pp):
        stages = [c * pp + r for c in range(v)]
        acts = [Action("F", mb, s) for s in stages for mb in range(m)]
        acts += [Action("B", mb, s) for s in reversed(stages) for mb in range(m)]
        out.append(acts)
    return out


def _one_f_one_b(pp: int, m: int, v: int) -> list[list[Action]]:
    """PipeDream-flush 1F1B: pp - r - 1 warm-up forwards, then alternate, then drain the backwards."""
    out = []
    for r in range(pp):
        warmup = min(pp - r - 1, m)
        acts = [Action("F", mb, r) for mb in range(warmup)]
        for i in range(m - warmup):
            acts += [Action("F", warmup + i, r), Action("B", i, r)]
        acts += [Action("B", mb, r) for mb in range(m - warmup, m)]
        out.append(acts)
    return out


def _interleaved(pp: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: micro-batches advance in groups of pp through the v local chunks."""
    out = []
    total = m * v

    def unit(k: int, backward: bool, r: int) -> tuple[int, int]:
        chunk = (k % (pp * v)) // pp
        if backward:
            chunk = v - 1 - chunk
        return (k // (pp * v)) * pp + k % pp, chunk * pp + r

    for r in range(pp):
        warmup = min((pp - r - 1) * 2 + (v - 1) * pp, total)
        acts = [Action("F", *unit(k, False, r)) for k in range(warmup)]
        for i in range(total - warmup):
            acts += [Action("F", *unit(warmup + i, False, r)), Action("B", *unit(i, True, r))]
        acts += [Action("B", *unit(k, True, r)) for k in range(total - warmup, total)]
        out.append(acts)
    return out


def _zb_h1(pp: int, m: int, v: int) -> list[list[Action]]:
    """ZB-H1: 1F1B with each backward split into I (gradient of the input, on the critical path)
    and W (gradient of the weights, which nothing waits for). Rank r runs W(j) right after
    I(j + r) and the last W's at the end, so the deferred W's fill the drain bubble: with
    F = I = W the makespan is 3m + p - 1 (bubble (p-1)/(3m+p-1), a third of 1F1B's for large m).
    A rank holds at most p micro-batches (F done, W not yet), 1F1B's peak on the first stage."""
    out = []
    for r, order in enumerate(_one_f_one_b(pp, m, 1)):
        acts, next_w = [], 0
        for a in order:
            if a.kind == "F":
                acts.append(a)
                continue
            acts.append(Action("I", a.mb, r))
            if a.mb >= r:
                acts.append(Action("W", next_w, r))
                next_w += 1
        acts += [Action("W", mb, r) for mb in range(next_w, m)]
        out.append(acts)
    return out


SCHEDULES: dict[str, Callable[[int, int, int], list[list[Action]]]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved_1f1b": _interleaved,
    "zb_h1": _zb_h1,
}


def check_schedule_args(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> None:
    """Raise ValueError naming the bad argument and the fix, before any work is done."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known schedules: {', '.join(SCHEDULES)} "
                         f"(set parallel.schedule)")
    if pp < 1 or n_micro < 1 or virtual_stages < 1:
        raise ValueError(f"pp={pp}, micro-batches={n_micro} and virtual_stages={virtual_stages} must all be >= 1")
    if name == "interleaved_1f1b":
        if virtual_stages < 2:
            raise ValueError(f"schedule interleaved_1f1b needs parallel.virtual_stages >= 2 (got {virtual_stages}); "
                             f"use schedule 1f1b for one chunk per rank")
        if n_micro % pp:
            raise ValueError(f"schedule interleaved_1f1b needs the number of micro-batches ({n_micro}) to be a "
                             f"multiple of pp={pp}; change train.global_batch_size or parallel.micro_batch_size")
    elif name in ("1f1b", "zb_h1") and virtual_stages != 1:
        raise ValueError(f"schedule {name} runs one chunk per rank but parallel.virtual_stages={virtual_stages}; "
                         f"use interleaved_1f1b (or gpipe) for virtual stages")


def build_schedule(name: str, pp: int, n_micro: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Every rank's ordered action list (compute and p2p) for one training step."""
    check_schedule_args(name, pp, n_micro, virtual_stages)
    order = SCHEDULES[name](pp, n_micro, virtual_stages)
    return _place_p2p(order, pp, n_micro, virtual_stages)


# ----------------------------------------------------------------------------- dependencies

def _deps(a: Action, S: int, split: bool) -> list[Action]:
    """Compute actions that must finish before `a` (possibly on other ranks)."""
    bwd = "I" if split else "B"
    if a.kind == "F":
        return [Action("F", a.mb, a.stage - 1)] if a.stage > 0 else []
    if a.kind in ("B", "I"):
        deps = [Action("F", a.mb, a.stage)]
        if a.stage < S - 1:
            deps.append(Action(bwd, a.mb, a.stage + 1))
        return deps
    return [Action("I", a.mb, a.stage)]    # W


def _unit_timeline(order: list[list[Action]], S: int) -> dict[Action, tuple[float, float]]:
    """(start, end) of every compute action, unit costs F=I=W=1, B=2, no communication cost."""
    cost = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    split = any(a.kind == "I" for acts in order for a in acts)
    times: dict[Action, tuple[float, float]] = {}
    pos, clock = [0] * len(order), [0.0] * len(order)
    progressed = True
    while progressed:
        progressed = False
        for r, acts in enumerate(order):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                deps = _deps(a, S, split)
                if any(d not in times for d in deps):
                    break
                start = max([clock[r]] + [times[d][1] for d in deps])
                times[a] = (start, start + cost[a.kind])
                clock[r] = start + cost[a.kind]
                pos[r] += 1
                progressed = True
    stuck = [str(acts[pos[r]]) for r, acts in enumerate(order) if pos[r] < len(acts)]
    if stuck:
        raise ValueError(f"compute order cannot run: ranks wait on each other at {stuck}")
    return times


def _place_p2p(order: list[list[Action]], pp: int, m: int, v: int) -> list[list[Action]]:
    """Insert SF/RF/SB/RB between the compute actions (see module docstring)."""
    S = pp * v
    times = _unit_timeline(order, S)
    split = any(a.kind == "I" for acts in order for a in acts)
    bwd = "I" if split else "B"
    # sends_after[r][i]: sends right after compute i; recvs_before[r][j]: receives before compute j
    sends_after = [[[] for _ in acts] for acts in order]
    recvs_before = [[[] for _ in range(len(acts) + 1)] for acts in order]
    index = {a: (r, i) for r, acts in enumerate(order) for i, a in enumerate(acts)}
    starts = [[times[a][0] for a in acts] for acts in order]
    sent_at: dict[Action, tuple[float, int, int]] = {}     # receive -> (send time, sender rank, position)
    for a, (r, i) in index.items():
        if a.kind == "F" and a.stage < S - 1:
            msg, consumer = Action("SF", a.mb, a.stage), Action("F", a.mb, a.stage + 1)
        elif a.kind == bwd and a.stage > 0:
            msg, consumer = Action("SB", a.mb, a.stage), Action(bwd, a.mb, a.stage - 1)
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
        return (a.kind[0] != "S",) + (sent_at[a] if a.kind[0] == "R" else ()) + (a.kind, a.stage, a.mb)

    out = []
    for r, acts in enumerate(order):
        seq: list[Action] = []
        pending: list[Action] = []
        for i, a in enumerate(acts):
            pending += recvs_before[r][i]
            seq += sorted(pending, key=key)
            pending = []
            seq.append(a)
            pending = list(sends_after[r][i])
        seq += sorted(pending + recvs_before[r][len(acts)], key=key)
        out.append(seq)
    return out


# ----------------------------------------------------------------------------- validation

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


def validate_schedule(actions: Sequence[Sequence[Action]], pp: int, n_micro: int, virtual_stages: int = 1) -> None:
    """Raise ValueError unless the lists are complete, ordered by their dependencies and deadlock-free.

    Complete: every (micro-batch, stage) is forwarded once and backwarded once (B, or I then W) on
    the rank that owns the stage; every cross-rank tensor has exactly one send and one receive.
    Ordered: on each rank a receive precedes the compute that consumes it, a send follows the
    compute that produces it, and same-rank dependencies come in order.
    Consistently ordered: for every ordered rank pair the receives come in the order of the sends
    (`check_p2p_order`), so matching by posting order, as NCCL and the tag-0 runtime do, pairs
    every receive with the message it names.
    Deadlock-free: `run_batches` completes under rendezvous semantics with ordered matching.
    """
    S = pp * virtual_stages
    if len(actions) != pp:
        raise ValueError(f"expected {pp} action lists (one per pp rank), got {len(actions)}")
    seen: dict[Action, int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if not 0 <= a.stage < S or not 0 <= a.mb < n_micro:
                raise ValueError(f"rank {r}: {a} is outside stages 0..{S - 1} / micro-batches 0..{n_micro - 1}")
            if a.stage % pp != r:
                raise ValueError(f"rank {r}: {a} acts on stage {a.stage}, which lives on rank {a.stage % pp}")
            if a.is_p2p and a.peer_stage % pp == r:
                raise ValueError(f"rank {r}: {a} sends to its own rank; same-rank stages hand over in memory")
            if a in seen:
                raise ValueError(f"rank {r}: {a} appears twice")
            seen[a] = r
    split = any(a.kind in ("I", "W") for a in seen)
    if split and any(a.kind == "B" for a in seen):
        raise ValueError("a schedule must use either B or I+W for every backward, not both")
    kinds = ("F", "I", "W") if split else ("F", "B")
    missing = [str(Action(k, mb, s)) for s in range(S) for mb in range(n_micro) for k in kinds
               if Action(k, mb, s) not in seen]
    if missing:
        raise ValueError(f"incomplete schedule: missing {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for a in seen:
        if a.is_p2p and a.partner() not in seen:
            raise ValueError(f"{a} on rank {seen[a]} has no matching {a.partner()} on rank {a.peer_stage % pp}")
    bwd = "I" if split else "B"
    for r, acts in enumerate(actions):
        pos = {a: i for i, a in enumerate(acts)}
        for a in acts:
            if a.is_p2p:
                continue
            for d in _deps(a, S, split):
                if d.stage % pp == r:
                    if pos[d] > pos[a]:
                        raise ValueError(f"rank {r}: {a} runs before {d}, which it needs")
                else:
                    recv = Action("RF", a.mb, a.stage) if a.kind == "F" else Action("RB", a.mb, a.stage)
                    if recv not in pos or pos[recv] > pos[a]:
                        raise ValueError(f"rank {r}: {a} needs {recv} before it")
        for a in acts:
            if a.kind in ("SF", "SB"):
                producer = Action("F" if a.kind == "SF" else bwd, a.mb, a.stage)
                if pos[producer] > pos[a]:
                    raise ValueError(f"rank {r}: {a} is sent before {producer} computes it")
    check_p2p_order(actions, pp)
    run_batches(actions, pp, lambda r, a: 1.0, 0.0)


def _describe(send: Action) -> str:
    direction = "activation" if send.kind == "SF" else "input gradient"
    return f"{send} (micro-batch {send.mb}, {direction} from stage {send.stage} to stage {send.peer_stage})"


def p2p_streams(actions: Sequence[Sequence[Action]], pp: int) -> dict[tuple[int, int], tuple[list[Action], list[Action]]]:
    """For every ordered rank pair (src, dst) that exchanges messages: the sends src posts to dst
    and the receives dst posts from src, each in posting (list) order."""
    streams: dict[tuple[int, int], tuple[list[Action], list[Action]]] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if a.kind[0] == "S" and a.is_p2p:
                streams.setdefault((r, a.peer_stage % pp), ([], []))[0].append(a)
            elif a.kind[0] == "R":
                streams.setdefault((a.peer_stage % pp, r), ([], []))[1].append(a)
    return streams


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


def run_batches(actions: Sequence[Sequence[Action]], pp: int, cost: Callable[[int, Action], float],
                p2p_time: float, *, rendezvous: bool = True) -> tuple[list[list[tuple[float, float, Action]]], float]:
    """Event simulation shared by the validator and the simulator.

    Compute actions take cost(rank, action). A p2p batch is posted when its rank reaches it and
    completes p2p_time after the last of its partners has been posted; the partner of the k-th
    send from one rank to another is the k-th receive posted there from that rank. With
    `rendezvous` a send waits for its receive like a receive waits for its send (the strict model
    the validator proves deadlock-free); without it sends are buffered and only receives wait,
    which is how the runtime behaves on gloo (it waits on its sends lazily).
    Returns each rank's timeline [(start, end, action)] and the makespan; raises ValueError naming
    the stuck actions on deadlock.
    """
    batches = [p2p_batches(acts) for acts in actions]
    # ordered matching, as NCCL (and the tag-0 runtime) does: the k-th send from src to dst meets
    # the k-th receive dst posts from src, whatever messages they name (check_p2p_order proves
    # they name the same one); an op without a counterpart never completes
    match: dict[Action, Action] = {}
    for sends, recvs in p2p_streams(actions, pp).values():
        for s, r in zip(sends, recvs):
            match[s], match[r] = r, s
    posted: dict[Action, float] = {}          # p2p action -> time its batch was posted
    pos, clock = [0] * pp, [0.0] * pp
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while pos[r] < len(batches[r]):
                item = batches[r][pos[r]]
                if isinstance(item, Action):
                    c = float(cost(r, item))
                    timeline[r].append((clock[r], clock[r] + c, item))
                    clock[r] += c
                else:
                    for a in item:
                        posted.setdefault(a, clock[r])
                    partners = [match.get(a) for a in item if rendezvous or a.kind[0] == "R"]
                    if any(p is None or p not in posted for p in partners):
                        break
                    end = max([clock[r]] + [posted[p] for p in partners]) + p2p_time
                    timeline[r].extend((clock[r], end, a) for a in item)
                    clock[r] = end
                pos[r] += 1
                progressed = True
    stuck = {r: [str(a) for a in batches[r][pos[r]]] for r in range(pp) if pos[r] < len(batches[r])}
    if stuck:
        detail = "; ".join(f"rank {r} waits in batch [{' '.join(b)}]" for r, b in stuck.items())
        raise ValueError(f"schedule deadlocks: {detail}")
    return timeline, max(clock) if clock else 0.0
