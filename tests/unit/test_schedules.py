"""Pipeline schedules and the simulator: pure Python, no processes."""
import pytest

from engine.pipeline.actions import Action, Kind, format_actions, parse_action
from engine.pipeline.generators import SCHEDULES, build_schedule
from engine.pipeline.lowering import hoist_receives, p2p_streams, place_p2p
from engine.pipeline.validate import build_step_actions, check_p2p_order, validate_schedule
from engine.pipeline.simulate import simulate, uniform_cost

COMBOS = [(name, pp, m, v)
          for pp in (1, 2, 3, 4, 5)
          for m in (1, 2, 3, 4, 6, 8, 10)
          for name, vs in (("gpipe", (1, 2)), ("1f1b", (1,)), ("zb_h1", (1,)), ("interleaved_1f1b", (2, 3)))
          for v in vs]


@pytest.mark.parametrize("name,pp,m,v", COMBOS)
def test_every_generator_validates(name, pp, m, v):
    actions = build_schedule(name, pp, m, v)
    validate_schedule(actions, pp, m, v)
    n_compute = sum(a.is_compute for acts in actions for a in acts)
    assert n_compute == pp * v * m * (3 if name == "zb_h1" else 2)
    for r, acts in enumerate(actions):
        assert all(a.stage % pp == r for a in acts)
    sim = simulate(actions, uniform_cost(1.0, 2.0))
    assert 0.0 <= sim.bubble < 1.0
    assert sim.makespan >= (3.0 if name != "zb_h1" else 3.0) * m * v


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 5), (3, 4), (4, 4), (4, 8), (4, 13), (5, 7), (8, 16)])
def test_gpipe_and_1f1b_bubble_closed_form(pp, m):
    closed = (pp - 1) / (m + pp - 1)
    for name in ("gpipe", "1f1b"):
        sim = simulate(build_schedule(name, pp, m), uniform_cost(1.0, 2.0))
        assert sim.bubble == pytest.approx(closed, abs=1e-12), name
        assert sim.makespan == pytest.approx(3.0 * (m + pp - 1))


@pytest.mark.parametrize("pp,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 2), (3, 9, 3), (8, 16, 2)])
def test_interleaved_bubble_is_one_vth(pp, m, v):
    """Megatron's closed form: bubble (p-1)/(v·m + p - 1), i.e. 1F1B's bubble time divided by v."""
    sim = simulate(build_schedule("interleaved_1f1b", pp, m, v), uniform_cost(1.0, 2.0))
    assert sim.bubble == pytest.approx((pp - 1) / (v * m + pp - 1), abs=1e-12)
    # a chunk is 1/v of a stage: same work per rank as 1F1B, 1/v of its idle time
    sim = simulate(build_schedule("interleaved_1f1b", pp, m, v), uniform_cost(1.0 / v, 2.0 / v))
    one_f_one_b = simulate(build_schedule("1f1b", pp, m), uniform_cost(1.0, 2.0))
    assert sum(sim.busy) == pytest.approx(sum(one_f_one_b.busy))
    idle, idle_1f1b = sim.makespan * pp - sum(sim.busy), one_f_one_b.makespan * pp - sum(one_f_one_b.busy)
    assert idle == pytest.approx(idle_1f1b / v)


def test_interleaved_takes_any_micro_batch_count():
    """m need not be a multiple of pp (rounds of uneven size, `interleaved_rounds`): for pp 2..6,
    v 2..3 (and 4 at pp ≤ 4) and m 1..2·pp+1 (every residue, and uneven rounds) the lists are complete, NCCL-ordered
    and deadlock-free (`test_every_rank_pair_receives_in_send_order` sweeps m 1..7 and 9 at pp ≤ 5 too);
    with m ≥ pp the bubble is Megatron's (p-1)/(v·m+p-1) exactly; with m < pp it is no worse than
    1F1B's. Makespan and peak activations are never worse than gpipe's over the same chunks."""
    from engine.pipeline.generators import interleaved_rounds

    assert interleaved_rounds(4, 8) == [4, 4] and interleaved_rounds(4, 9) == [5, 4]
    assert interleaved_rounds(4, 3) == [3] and interleaved_rounds(4, 7) == [7]
    assert interleaved_rounds(3, 11) == [4, 4, 3]
    checked = 0
    for pp in range(2, 7):
        for v in (2, 3, 4) if pp <= 4 else (2, 3):
            for m in range(1, 2 * pp + 2):
                actions = build_schedule("interleaved_1f1b", pp, m, v)
                validate_schedule(actions, pp, m, v)
                cost = uniform_cost(1.0 / v, 2.0 / v)
                sim = simulate(actions, cost)
                gpipe = simulate(build_schedule("gpipe", pp, m, v), cost)
                assert sim.makespan <= gpipe.makespan + 1e-9, (pp, v, m)
                assert max(sim.peak_activations) <= max(gpipe.peak_activations), (pp, v, m)
                if m >= pp:
                    assert sim.bubble == pytest.approx((pp - 1) / (v * m + pp - 1), abs=1e-12), (pp, v, m)
                else:
                    one_f_one_b = simulate(build_schedule("1f1b", pp, m), uniform_cost(1.0, 2.0))
                    assert sim.makespan <= one_f_one_b.makespan + 1e-9, (pp, v, m)
                checked += 1
    assert checked == 3 * (5 + 7 + 9) + 2 * (11 + 13)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (5, 10), (8, 32)])
def test_zb_h1_bubble_is_a_third_of_1f1b(pp, m):
    """With F = I = W = 1 (so B = 2): makespan 3m + p - 1, bubble (p-1)/(3m+p-1)."""
    cost = uniform_cost(1.0, 2.0, w=1.0)
    zb = simulate(build_schedule("zb_h1", pp, m), cost)
    base = simulate(build_schedule("1f1b", pp, m), cost)
    assert zb.makespan == pytest.approx(3 * m + pp - 1)
    assert zb.bubble == pytest.approx((pp - 1) / (3 * m + pp - 1))
    bubble_time, base_time = zb.bubble * zb.makespan * pp, base.bubble * base.makespan * pp
    assert bubble_time == pytest.approx(base_time / 3)


@pytest.mark.parametrize("pp,m", [(2, 3), (4, 8), (4, 3), (5, 12)])
def test_peak_in_flight_on_first_stage(pp, m):
    cost = uniform_cost(1.0, 2.0)
    assert simulate(build_schedule("gpipe", pp, m), cost).peak_activations[0] == m
    f1b = simulate(build_schedule("1f1b", pp, m), cost).peak_activations
    assert f1b[0] == min(pp, m)
    assert f1b == [min(pp - r, m) for r in range(pp)]
    assert max(simulate(build_schedule("zb_h1", pp, m), cost).peak_activations) <= pp


def test_unequal_costs_and_p2p_time_lengthen_the_makespan():
    actions = build_schedule("1f1b", 3, 6)
    slow_last = simulate(actions, lambda r, a: (2.0 if r == 2 else 1.0) * (1 if a.kind == "F" else 2))
    even = simulate(actions, uniform_cost())
    assert slow_last.makespan > even.makespan
    assert simulate(actions, uniform_cost(), p2p_time=0.5).makespan > even.makespan
    assert slow_last.busy[2] == pytest.approx(2 * slow_last.busy[0])


def test_action_text_round_trips_and_prints_compactly():
    a = Action(1, "F", 3)
    assert str(a) == "1F3" and parse_action("1F3") == a
    assert parse_action("7SB12") == Action(7, "SB", 12)
    assert Action(0, "SF", 2).partner() == Action(1, "RF", 2)
    text = format_actions(build_schedule("1f1b", 2, 2))
    assert text.splitlines()[0].startswith("rank 0: 0F0 0SF0")
    with pytest.raises(ValueError, match="unknown action kind"):
        Action(0, "X", 0)


def test_every_kind_round_trips_with_the_stage_first():
    for kind in Kind:
        a = Action(12, kind, 7)
        assert str(a) == f"12{kind.value}7" and parse_action(str(a)) == a and a.kind is kind
        assert a.is_compute == (kind in ("F", "B", "I", "W")) and a.is_p2p != a.is_compute
    assert Action(1, "F", 3) == Action(1, Kind.F, 3) and len({Action(1, "F", 3), Action(1, Kind.F, 3)}) == 1
    assert sorted([Action(1, "B", 0), Action(0, "F", 1), Action(0, "B", 2)]) == \
        [Action(0, "B", 2), Action(0, "F", 1), Action(1, "B", 0)]
    for text in ("F3c1", "1F", "F3", "1f3"):
        with pytest.raises(ValueError, match="cannot parse action"):
            parse_action(text)


def test_chart_draws_every_rank():
    sim = simulate(build_schedule("1f1b", 4, 8), uniform_cost())
    chart = sim.chart(width=66)
    lines = chart.splitlines()
    assert len(lines) == 5 and all(len(line) == len("rank 0 |") + 66 + 1 for line in lines[:4])
    assert "B0" in lines[3] and lines[3].startswith("rank 3 |" + "." * 6)


def test_validator_rejects_incomplete_and_misordered_lists():
    good = build_schedule("1f1b", 2, 2)
    missing = [list(good[0]), [a for a in good[1] if a != Action(1, "B", 1)]]
    with pytest.raises(ValueError, match="missing 1B1"):
        validate_schedule(missing, 2, 2)
    unmatched = [list(good[0]), [a for a in good[1] if a != Action(1, "SB", 0)]]
    with pytest.raises(ValueError, match="no matching 1SB0"):
        validate_schedule(unmatched, 2, 2)
    wrong_rank = [list(good[0]) + [Action(1, "F", 0)], list(good[1])]
    with pytest.raises(ValueError, match="lives on rank 1"):
        validate_schedule(wrong_rank, 2, 2)
    backward_first = [list(good[0]), list(good[1])]
    i, j = backward_first[1].index(Action(1, "F", 0)), backward_first[1].index(Action(1, "B", 0))
    backward_first[1][i], backward_first[1][j] = backward_first[1][j], backward_first[1][i]
    with pytest.raises(ValueError, match="1B0 runs before 1F0"):
        validate_schedule(backward_first, 2, 2)


# every schedule at pp 1..5, m 1..7 and 9, v 1..3 where the schedule allows it (a loop: about 2.5 s)
SWEEP = [(name, pp, m, v)
         for pp in range(1, 6)
         for m in (1, 2, 3, 4, 5, 6, 7, 9)
         for name, vs in (("gpipe", (1, 2, 3)), ("1f1b", (1,)), ("zb_h1", (1,)), ("interleaved_1f1b", (2, 3)))
         for v in vs]


def test_every_rank_pair_receives_in_send_order():
    """NCCL matches a pair's messages in posting order: message k must be the same on both ends.
    Also for the forward-only lists the runtime derives from gpipe (evaluation)."""
    assert len(SWEEP) == 280
    for name, pp, m, v in SWEEP:
        actions = build_schedule(name, pp, m, v)
        validate_schedule(actions, pp, m, v)           # runs check_p2p_order
        forward_only = [[a for a in acts if a.kind in ("F", "SF", "RF")] for acts in build_schedule("gpipe", pp, m, v)]
        step = build_step_actions(name, pp, m, v)    # what the trainer hands the runtime
        assert (step.train, step.forward, step.n_micro, step.virtual_stages) == (actions, forward_only, m, v)
        for lists in (actions, forward_only):
            check_p2p_order(lists, pp)
            for (src, dst), (sends, recvs) in p2p_streams(lists, pp).items():
                assert [(a.mb, a.stage, a.kind[1]) for a in sends] == \
                       [(a.mb, a.peer_stage, a.kind[1]) for a in recvs], (name, pp, m, v, src, dst)
        n_msgs = sum(len(s) for s, _ in p2p_streams(actions, pp).values())
        assert n_msgs == (0 if pp == 1 else 2 * m * (pp * v - 1)), (name, pp, m, v)


def test_validator_rejects_sends_in_another_order_than_their_receives():
    # rank 0 posts micro-batch 1's activation before micro-batch 0's; rank 1 receives 0 first.
    # Tags would sort this out; NCCL would hand 1F0 micro-batch 1's activation.
    good = build_schedule("gpipe", 2, 2)
    swapped = [[Action(0, "F", 0), Action(0, "F", 1), Action(0, "SF", 1), Action(0, "SF", 0)]
               + good[0][4:], list(good[1])]
    with pytest.raises(ValueError, match=r"p2p order mismatch from rank 0 to rank 1 at message 0: rank 0 posts "
                                         r"0SF1 \(micro-batch 1, activation from stage 0 to stage 1\), but rank 1 "
                                         r"posts 1RF0, which expects 0SF0 \(micro-batch 0"):
        validate_schedule(swapped, 2, 2)
    # the interleaved case the generator once got wrong: two receives of one batch sorted by stage
    actions = build_schedule("interleaved_1f1b", 4, 8, 2)
    i, j = actions[2].index(Action(6, "RF", 3)), actions[2].index(Action(2, "RF", 4))
    assert j == i + 1
    actions[2][i], actions[2][j] = actions[2][j], actions[2][i]
    with pytest.raises(ValueError, match=r"from rank 1 to rank 2 at message 7: rank 1 posts 5SF3 .* but rank 2 "
                                         r"posts 2RF4, which expects 1SF4"):
        validate_schedule(actions, 4, 8, 2)


def test_validator_finds_deadlock():
    # rank 0 waits for the gradient before sending the activation the gradient depends on
    deadlock = [[Action(0, "RB", 0), Action(0, "F", 0), Action(0, "SF", 0), Action(0, "B", 0)],
                [Action(1, "RF", 0), Action(1, "F", 0), Action(1, "B", 0), Action(1, "SB", 0)]]
    with pytest.raises(ValueError, match="deadlocks: rank 0 waits in batch \\[0RB0\\]"):
        validate_schedule(deadlock, 2, 1)


@pytest.mark.parametrize("args,match", [
    (("pipedream", 2, 4, 1), "unknown pipeline schedule 'pipedream'; known schedules: gpipe, 1f1b"),
    (("interleaved_1f1b", 2, 4, 1), "virtual_stages >= 2"),
    (("1f1b", 2, 4, 2), "use interleaved_1f1b"),
    (("zb_h1", 2, 0, 1), "must all be >= 1"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(*args)


def test_schedules_registry_lists_the_six():
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"}


@pytest.mark.parametrize("name,v", [("zb_h1", 1), ("interleaved_1f1b", 2)])
def test_show_schedule_trace_has_one_slice_per_action_per_rank(name, v, tmp_path):
    """`scripts/show_schedule.py --trace FILE`: a Chrome trace whose rank tracks hold exactly that
    rank's compute actions, in order, at their simulated times, and whose p2p tracks hold its p2p
    actions (the wait from posting to completion)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pp, m = 3, 6
    out = tmp_path / "timeline.json"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "scripts/show_schedule.py", "--schedule", name, "--pp", str(pp), "--micro",
                    str(m), "--virtual", str(v), "--trace", str(out)], cwd=root, check=True, capture_output=True)
    trace = json.loads(out.read_text())
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {t: f"rank {t // 2}" + (" p2p" if t % 2 else "") for t in range(2 * pp)}
    sim = simulate(build_schedule(name, pp, m, v), uniform_cost(1.0 / v, 2.0 / v, 1.0 / v))
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for r in range(pp):
        for tid, compute in ((2 * r, True), (2 * r + 1, False)):
            got = [(e["name"], e["ts"], e["dur"]) for e in slices if e["tid"] == tid]
            want = [(str(a), s * 1000.0, (e - s) * 1000.0) for s, e, a in sim.timeline[r] if a.is_compute == compute]
            assert got == want and got, (r, compute)
    assert trace["otherData"]["makespan"] == sim.makespan


# -- overlapped p2p: receives posted early (lowering.hoist_receives) ------------------------------
def _recv_places(lists):
    """{receive: how many compute actions its rank runs before posting it}"""
    places = {}
    for acts in lists:
        done = 0
        for a in acts:
            if a.is_compute:
                done += 1
            elif a.kind.is_recv:
                places[a] = done
    return places


EARLY = [(name, pp, m, v) for pp in (2, 3, 4, 5) for m in (1, 3, 4, 8)
         for name, vs in (("gpipe", (1, 2)), ("1f1b", (1,)), ("zb_h1", (1,)), ("interleaved_1f1b", (2,)))
         for v in vs if not (name == "interleaved_1f1b" and m % pp)]


def test_receives_only_move_earlier_by_at_most_the_window_and_stay_proven():
    """Lowering posts receives early (`hoist_receives`): same compute order, same sends, every
    receive at or before where the unit timeline put it and at most one compute action before its
    consumer unless it already was; the lists still pass the validator (order and rendezvous
    deadlock freedom), also with a wider window."""
    moved = {}
    for name, pp, m, v in EARLY:
        order = SCHEDULES[name](pp, m, v)
        before, after = place_p2p(order, pp * v, early_recv=0), place_p2p(order, pp * v)
        assert after == build_schedule(name, pp, m, v)
        validate_schedule(after, pp, m, v)
        for old, new in zip(before, after):
            assert [a for a in new if not a.kind.is_recv] == [a for a in old if not a.kind.is_recv]
        was, now = _recv_places(before), _recv_places(after)
        assert was.keys() == now.keys()
        for recv, place in now.items():
            acts = after[next(r for r, acts in enumerate(after) if recv in acts)]
            uses = [a for a in acts if a.is_compute].index(
                next(a for a in acts if a.is_compute and a.stage == recv.stage and a.mb == recv.mb
                     and (a.kind == "F") == (recv.kind == "RF")))
            assert min(was[recv], uses - 1) <= place <= was[recv], (name, pp, m, v, recv)
        moved[name] = moved.get(name, 0) + sum(now[a] < was[a] for a in now)
        validate_schedule(hoist_receives(before, window=4), pp, m, v)
    assert moved["zb_h1"] > 0, moved


def test_early_receives_shorten_the_simulated_step_with_p2p_cost_and_never_lengthen_it():
    """The simulator runs the lists as the runtime does (a compute waits only for the batch holding
    its input, batches run in order on the p2p stream), so a receive posted early lets its
    transfer overlap the compute before its consumer."""
    order = SCHEDULES["zb_h1"](4, 16, 1)
    before, after = place_p2p(order, 4, early_recv=0), place_p2p(order, 4)
    cost = uniform_cost(1.0, 2.0, w=1.0)
    assert simulate(before, cost).makespan == simulate(after, cost).makespan == 3 * 16 + 4 - 1
    assert simulate(before, cost, p2p_time=0.5).makespan == pytest.approx(68.5)
    assert simulate(after, cost, p2p_time=0.5).makespan == pytest.approx(57.0)
    for name, pp, m, v in EARLY[::3]:
        order = SCHEDULES[name](pp, m, v)
        before, after = place_p2p(order, pp * v, early_recv=0), place_p2p(order, pp * v)
        for cost in (uniform_cost(1.0 / v, 2.0 / v), uniform_cost(1.0 / v, 1.7 / v, 0.5 / v),
                     lambda r, a: (1.3 if r == 1 else 1.0) * (1.0 if a.kind == "F" else 1.5)):
            for p in (0.1, 0.5):
                assert simulate(after, cost, p).makespan <= simulate(before, cost, p).makespan + 1e-9, (name, pp, m, v)


def test_simulated_receive_is_waited_for_only_by_its_consumer():
    # rank 1 posts 1RF0, runs an unrelated 1B5 (2 units) while the activation travels (0.5 after
    # rank 0 posts it at 1), then 1F0 starts without waiting; a rank that blocked at the batch
    # (the validator's rendezvous model) would start 1B5 only at 1.5
    lists = [[Action(0, "F", 0), Action(0, "SF", 0)], [Action(1, "RF", 0), Action(1, "B", 5), Action(1, "F", 0)]]
    cost = uniform_cost(1.0, 2.0)
    runtime = simulate(lists, cost, p2p_time=0.5)
    assert [(s, e, str(a)) for s, e, a in runtime.timeline[1]] == [(0.0, 1.5, "1RF0"), (0.0, 2.0, "1B5"),
                                                                    (2.0, 3.0, "1F0")]
    assert simulate(lists, cost, p2p_time=0.5, rendezvous=True).makespan == 4.5


def test_order_check_and_deadlock_proof_still_catch_bad_early_receives():
    # swapping two receives from one peer (1RF3 was posted early, before 1W0) breaks NCCL's
    # posting-order matching
    actions = build_schedule("zb_h1", 3, 4)
    i, j = actions[1].index(Action(1, "RF", 2)), actions[1].index(Action(1, "RF", 3))
    assert actions[1][j + 1] == Action(1, "W", 0)
    actions[1][i], actions[1][j] = actions[1][j], actions[1][i]
    with pytest.raises(ValueError, match=r"p2p order mismatch from rank 0 to rank 1 at message 2: rank 0 posts "
                                         r"0SF2 .* but rank 1 posts 1RF3"):
        check_p2p_order(actions, 3)
    # a gradient received before the activation it depends on is sent deadlocks; the lowering never
    # moves it there, whatever the window
    lists = build_schedule("1f1b", 2, 2)
    early = [[Action(0, "RB", 0)] + [a for a in lists[0] if a != Action(0, "RB", 0)], lists[1]]
    with pytest.raises(ValueError, match="deadlocks"):
        validate_schedule(early, 2, 2)
    wide = hoist_receives(place_p2p(SCHEDULES["1f1b"](2, 2, 1), 2, early_recv=0), window=10)
    assert wide[0].index(Action(0, "RB", 0)) > wide[0].index(Action(0, "SF", 0))
    validate_schedule(wide, 2, 2)
