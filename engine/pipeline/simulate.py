"""Event simulation of action lists: timeline, makespan, bubble and peak activations per rank.

`run_batches` executes the lists: compute actions back to back, consecutive p2p actions as one
batch that waits for its partners. The validator runs it with rendezvous semantics (the rank
blocks at every batch) to prove lists deadlock-free; `simulate` runs it as the runtime does (a
compute waits only for the batch holding its input, batches run in order on the rank's p2p
stream), with per-action costs, so the planner can compare schedules and micro-batch counts
without running anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from engine.pipeline.actions import Action, Kind
from engine.pipeline.lowering import p2p_batches, p2p_streams


def run_batches(actions: Sequence[Sequence[Action]], pp: int, cost: Callable[[int, Action], float],
                p2p_time: float, *, rendezvous: bool = True,
                network: str = "nccl") -> tuple[list[list[tuple[float, float, Action]]], float]:
    """Compute actions take cost(rank, action). A p2p batch is posted when its rank reaches it and
    completes p2p_time after the last of its partners has been posted; the partner of the k-th
    send from one rank to another is the k-th receive posted there from that rank. With
    `rendezvous` the rank blocks at each batch until every partner batch has been posted, sends
    included (the strict model the validator proves deadlock-free: an NCCL group kernel on one
    stream finishes a batch only once all its operations are matched). Without it the lists run
    as the runtime runs them (`_run_streams`): posting does not block, and a compute waits only
    for the batch that holds its input. ``network`` (without `rendezvous`): "nccl" runs each rank's
    batches in order on one stream, a batch finishing only once its partners (sends included) have
    started; "gloo" buffers sends and lets every receive finish on its own once its send is posted
    (gloo's per-operation works, and the papers' model of free, non-blocking communication).
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
    if network not in ("nccl", "gloo"):
        raise ValueError(f"unknown network model {network!r}; expected 'nccl' or 'gloo'")
    if not rendezvous:
        return _run_streams(batches, match, cost, p2p_time, buffered=network == "gloo")
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
                    partners = [match.get(a) for a in item if rendezvous or a.kind.is_recv]
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


def _run_streams(batches: list[list], match: dict[Action, Action], cost: Callable[[int, Action], float],
                 p2p_time: float, buffered: bool = False) -> tuple[list[list[tuple[float, float, Action]]], float]:
    """The runtime's timing: each rank has a compute stream and a communication stream (NCCL's
    p2p stream). A batch is posted when the compute before it ends and starts on the communication
    stream once the rank's previous batch has finished (one stream runs them in order); it is one
    group, so it finishes p2p_time after the last of its own and its partners' batches has started.
    A compute waits only for the batch holding the receive it consumes (the coalesced Work), so a
    receive posted early lets the transfer overlap the computes in between, while a batch that
    waits for a late partner holds up the rank's later batches. Sends are waited for at the end.
    ``buffered`` (gloo): no stream order, and a batch waits only for the sends of its receives."""
    pp = len(batches)
    where: dict[Action, tuple[int, int]] = {}        # p2p action -> (rank, batch item)
    recv_of: dict[Action, tuple[int, int]] = {}      # consuming compute -> batch holding its input
    for r, items in enumerate(batches):
        for k, item in enumerate(items):
            if isinstance(item, list):
                for a in item:
                    where[a] = (r, k)
                    if a.kind.is_recv:       # consumed by the stage's F, or by its B (or I)
                        for kind in (Kind.F,) if a.kind == Kind.RF else (Kind.B, Kind.I):
                            recv_of[Action(a.stage, kind, a.mb)] = (r, k)
    started: dict[tuple[int, int], float] = {}
    ended: dict[tuple[int, int], float] = {}

    def end(b: tuple[int, int]) -> float | None:
        if b not in ended:
            partners = [where.get(match[a]) if a in match else None for a in batches[b[0]][b[1]]
                        if not buffered or a.kind.is_recv]
            if b not in started or any(p not in started for p in partners):
                return None
            ended[b] = max([started[b]] + [started[p] for p in partners]) + p2p_time
        return ended[b]

    pos, clock = [0] * pp, [0.0] * pp
    last: list[tuple[int, int] | None] = [None] * pp       # the rank's latest batch
    ran: dict[tuple[int, int], tuple[float, float]] = {}    # compute item -> (start, end)
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while pos[r] < len(batches[r]):
                item = batches[r][pos[r]]
                if isinstance(item, Action):
                    waits = recv_of.get(item)
                    ready = 0.0 if waits is None else end(waits)
                    if ready is None:
                        break
                    start = max(clock[r], ready)
                    c = float(cost(r, item))
                    ran[(r, pos[r])] = (start, start + c)
                    clock[r] = start + c
                else:
                    free = 0.0 if last[r] is None or buffered else end(last[r])
                    if free is None:
                        break
                    started[(r, pos[r])] = max(clock[r], free)
                    last[r] = (r, pos[r])
                pos[r] += 1
                progressed = True
    stuck = {r: batches[r][pos[r]] for r in range(pp) if pos[r] < len(batches[r])}
    unfinished = [b for b in started if end(b) is None]
    if stuck or unfinished:
        detail = "; ".join(f"rank {r} waits at {' '.join(map(str, b)) if isinstance(b, list) else b}"
                           for r, b in stuck.items())
        raise ValueError(f"schedule deadlocks: {detail or 'unmatched p2p at the end of the step'}")
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    for r, items in enumerate(batches):         # in list order, as `run_batches` reports
        for k, item in enumerate(items):
            if isinstance(item, list):
                timeline[r].extend((started[(r, k)], ended[(r, k)], a) for a in item)
            else:
                timeline[r].append((*ran[(r, k)], item))
    makespan = max([0.0] + clock + list(ended.values()))
    return timeline, makespan


@dataclass
class SimResult:
    makespan: float
    busy: list[float]                      # compute time per rank
    bubble: float                          # 1 - sum(busy) / (pp * makespan)
    peak_activations: list[int]            # per rank: max (micro-batch, chunk) activations held at once
    timeline: list[list[tuple[float, float, Action]]]

    @property
    def pp(self) -> int:
        return len(self.timeline)

    @property
    def idle_in_span(self) -> list[float]:
        """Per rank: idle time between its first compute action's start and its last one's end. The
        zero-bubble papers' "bubble": their ranks start one forward apart (a staircase) and, with the
        optimizer step not synchronized across ranks (Qi et al. §4), only idle inside a rank's own
        span is lost. `bubble` is the stricter whole-makespan figure."""
        out = []
        for row, busy in zip(self.timeline, self.busy):
            spans = [(s, e) for s, e, a in row if a.is_compute]
            out.append(spans[-1][1] - spans[0][0] - busy if spans else 0.0)
        return out

    def chart(self, width: int = 100) -> str:
        """ASCII timeline: one row per rank, each compute action drawn as its label ("F3" or, with
        several chunks per rank, the full "1F3") stretched to its duration; '.' is idle or waiting."""
        if self.makespan <= 0:
            return "\n".join(f"rank {r} |" for r in range(self.pp))
        scale = width / self.makespan
        multi_chunk = any(a.stage >= self.pp for row in self.timeline for _, _, a in row)
        rows = []
        for r, row in enumerate(self.timeline):
            cells = ["."] * width
            for start, end, a in row:
                if not a.is_compute:
                    continue
                lo, hi = round(start * scale), max(round(end * scale), round(start * scale) + 1)
                label = str(a) if multi_chunk else f"{a.kind}{a.mb}"
                text = (label + "-" * (hi - lo))[: hi - lo] if hi - lo > 1 else a.kind
                for k, ch in enumerate(text):
                    if lo + k < width:
                        cells[lo + k] = ch
            rows.append(f"rank {r} |{''.join(cells)}|")
        rows.append(f"makespan {self.makespan:g}, bubble {self.bubble:.1%}, "
                    f"peak activations per rank {self.peak_activations}")
        return "\n".join(rows)


    def chrome_trace(self, us_per_unit: float = 1000.0) -> dict:
        """The timeline as a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing): one
        track per rank with a slice per compute action, and under it one track per rank with a slice
        per p2p action from the moment its batch starts (on the rank's p2p stream; under
        `rendezvous`, is posted) to the moment it completes.
        Simulated time units are drawn as ``us_per_unit`` microseconds."""
        events: list[dict] = []
        for r in range(self.pp):
            for tid, name in ((2 * r, f"rank {r}"), (2 * r + 1, f"rank {r} p2p")):
                events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": tid,
                               "args": {"sort_index": tid}})
            for start, end, a in self.timeline[r]:
                events.append({"ph": "X", "name": str(a), "cat": "compute" if a.is_compute else "p2p", "pid": 0,
                               "tid": 2 * r if a.is_compute else 2 * r + 1, "ts": start * us_per_unit,
                               "dur": (end - start) * us_per_unit,
                               "args": {"stage": a.stage, "kind": str(a.kind), "micro_batch": a.mb}})
        events.append({"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "simulated pipeline"}})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"makespan": self.makespan, "bubble": self.bubble,
                              "peak_activations": self.peak_activations}}


def simulate(actions: Sequence[Sequence[Action]], cost: Callable[[int, Action], float],
             p2p_time: float = 0.0, *, rendezvous: bool = False, network: str = "nccl") -> SimResult:
    """Run the lists through the event simulation; `cost(rank, action)` gives each compute action's
    duration, every p2p batch takes `p2p_time` once it and its partners have started, overlapping
    the computes that do not need it (as the runtime runs them); `rendezvous=True` makes the rank
    block at every batch instead (the validator's model). ``network``: "nccl" (one p2p stream per
    rank, a send holding its batch until the receiver posts) or "gloo" (buffered sends); see
    `run_batches`.
    Raises ValueError if the lists deadlock."""
    pp = len(actions)
    timeline, makespan = run_batches(actions, pp, cost, p2p_time, rendezvous=rendezvous, network=network)
    busy = [sum(e - s for s, e, a in row if a.is_compute) for row in timeline]
    bubble = 1.0 - sum(busy) / (pp * makespan) if makespan > 0 else 0.0
    return SimResult(makespan=makespan, busy=busy, bubble=bubble,
                     peak_activations=[_peak_held(row) for row in timeline], timeline=timeline)


def _peak_held(row: list[tuple[float, float, Action]]) -> int:
    """Activations of a (micro-batch, stage) are held from its F until its B (or its W, which still
    needs the stage's inputs) has finished."""
    held = peak = 0
    for _, _, a in row:               # a rank's actions run in list order, so list order is time order
        if a.kind == Kind.F:
            held += 1
            peak = max(peak, held)
        elif a.kind in (Kind.B, Kind.W):
            held -= 1
    return peak


def uniform_cost(f: float = 1.0, b: float = 2.0, w: float | None = None) -> Callable[[int, Action], float]:
    """Equal cost on every rank: F = f, B = b, and for split backwards I = b - w, W = w (w defaults to b/2)."""
    w = b / 2 if w is None else w
    table = {Kind.F: f, Kind.B: b, Kind.I: b - w, Kind.W: w}
    return lambda rank, a: table[a.kind]
