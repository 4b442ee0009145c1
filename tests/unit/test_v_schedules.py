"""ZB-V and DualPipeV: the V placement, the closed forms of their simulated timelines, and the
validator catching a broken V list. Pure Python, no processes."""
import pytest

from engine.layout import rank_stages, stage_rank
from engine.pipeline.actions import Action, Kind
from engine.pipeline.generators import build_forward_only, build_schedule, schedule_placement
from engine.pipeline.lowering import p2p_streams
from engine.pipeline.simulate import simulate, uniform_cost
from engine.pipeline.validate import build_step_actions, validate_schedule

UNIT = uniform_cost(1.0, 2.0, 1.0)   # per chunk: F = I = W = 1, so B = 2


def test_v_placement_puts_rank_r_on_stages_r_and_2p_minus_1_minus_r():
    assert [rank_stages(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [stage_rank(s, 4, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [rank_stages(r, 4, 2, "loop") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert {schedule_placement(n) for n in ("zbv", "dualpipev")} == {"v"}
    assert schedule_placement("interleaved_1f1b") == "loop"
    with pytest.raises(ValueError, match="exactly two chunks"):
        rank_stages(0, 4, 3, "v")


V_SWEEP = [(name, pp, m) for name in ("zbv", "dualpipev") for pp in (1, 2, 3, 4, 5) for m in range(1, 2 * pp + 3)
           if not (name == "dualpipev" and m < 2 * pp)]


@pytest.mark.parametrize("name,pp,m", V_SWEEP)
def test_v_schedules_validate_and_hand_the_turn_over_in_memory(name, pp, m):
    actions = build_schedule(name, pp, m, 2)
    validate_schedule(actions, pp, m, 2, "v")
    for r, acts in enumerate(actions):
        assert {a.stage for a in acts} <= {r, 2 * pp - 1 - r}
    # every stage boundary crosses ranks but the turn (stage p-1 -> p, both on rank p-1)
    n_msgs = sum(len(sends) for sends, _ in p2p_streams(actions, pp).values())
    assert n_msgs == 2 * m * (2 * pp - 2)
    step = build_step_actions(name, pp, m, 2)
    assert step.placement == "v" and step.train == actions
    assert step.forward == build_forward_only(name, pp, m, 2)
    assert [step.stages(r) for r in range(pp)] == [[r, 2 * pp - 1 - r] for r in range(pp)]


@pytest.mark.parametrize("pp,m", [(2, 3), (2, 8), (3, 5), (4, 7), (4, 8), (4, 16), (5, 9), (8, 15), (8, 32)])
def test_zbv_has_zero_bubble_with_equal_costs_at_1f1b_memory(pp, m):
    """Qi et al. §6: with F = I = W, ZB-V keeps every rank busy from its first action to its last
    (once m >= 2p-1 fills the ramps); the ranks start one forward apart, so the makespan is
    6m + p - 1 chunk-units. Peak: 2p chunk activations = p stages' worth, 1F1B's first stage."""
    sim = simulate(build_schedule("zbv", pp, m, 2), UNIT)
    assert sim.idle_in_span == [0.0] * pp
    assert sim.makespan == 6 * m + pp - 1
    assert max(sim.peak_activations) == 2 * pp
    one_f_one_b = simulate(build_schedule("1f1b", pp, m, 1), uniform_cost(2.0, 4.0))   # same work per rank
    assert max(one_f_one_b.peak_activations) * 2 == max(sim.peak_activations)   # chunk = half a stage
    assert sim.makespan < one_f_one_b.makespan


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 9), (3, 6), (4, 8), (4, 16), (5, 13), (8, 16)])
@pytest.mark.parametrize("f,i,w", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 1.0, 1.0)])
def test_dualpipev_stays_within_its_published_bubble_and_activations(pp, m, f, i, w):
    """The DualPipe README: DualPipeV's bubble (PP/2 - 1)(F&B + B - 3W), PP counting DualPipe's ranks
    (2p here), and PP + 1 chunk activations per rank. An F&B pair runs as its F then its B here
    (F&B = F + B; the pair's overlap is of communication, which unit costs do not charge). With
    F = I = W the simulated worst rank idles p - 1 chunk-units, half the bound, and the makespan
    equals ZB-V's. The README's model is communication that never blocks: the simulator's "gloo"
    network (buffered sends). Under its "nccl" stream model DualPipeV pays for sends that hold a
    rank's p2p stream until their receiver posts (docs/schedules.md)."""
    sim = simulate(build_schedule("dualpipev", pp, m, 2), uniform_cost(f, i + w, w), network="gloo")
    b, fb = i + w, f + i + w
    assert max(sim.idle_in_span) <= (pp - 1) * (fb + b - 3 * w) + 1e-9
    assert max(sim.peak_activations) == 2 * pp + 1
    if (f, i, w) == (1.0, 1.0, 1.0):
        assert max(sim.idle_in_span) == pp - 1
        assert sim.makespan == 6 * m + pp - 1


@pytest.mark.parametrize("network", ["nccl", "gloo"])
def test_zbv_closed_form_holds_on_either_network_model(network):
    sim = simulate(build_schedule("zbv", 4, 12, 2), UNIT, network=network)
    assert sim.idle_in_span == [0.0] * 4 and sim.makespan == 6 * 12 + 3


def test_dualpipev_pairs_forwards_with_backwards_and_mixes_b_with_i_and_w():
    actions = build_schedule("dualpipev", 4, 8, 2)
    for r, acts in enumerate(actions):
        compute = [a for a in acts if a.is_compute]
        pairs = [(x, y) for x, y in zip(compute, compute[1:]) if x.kind == Kind.F and y.kind == Kind.B
                 and x.stage != y.stage]
        assert len(pairs) >= 2 * (8 - 8 + r + 1) - 1, (r, pairs)   # the F&B steady state
        kinds = {a.kind for a in compute}
        assert {Kind.B, Kind.I, Kind.W} <= kinds
        split = {(a.stage, a.mb) for a in compute if a.kind == Kind.I}
        assert split == {(a.stage, a.mb) for a in compute if a.kind == Kind.W}
        assert not split & {(a.stage, a.mb) for a in compute if a.kind == Kind.B}


def test_validator_catches_a_broken_v_list():
    good = build_schedule("zbv", 2, 3, 2)
    validate_schedule(good, 2, 3, 2, "v")
    # the same lists are wrong under the loop placement: stage 3 lives on rank 1 there
    with pytest.raises(ValueError, match="acts on stage 3, which lives on rank 1"):
        validate_schedule(good, 2, 3, 2, "loop")
    # a stage moved to the wrong rank of the V
    moved = [[a for a in good[0] if a.stage != 3], list(good[1]) + [a for a in good[0] if a.stage == 3]]
    with pytest.raises(ValueError, match="lives on rank 0 \\(v placement\\)"):
        validate_schedule(moved, 2, 3, 2, "v")
    # the turn's forward before the forward it continues (same rank, in memory)
    turn = [list(good[0]), list(good[1])]
    i, j = turn[1].index(Action(1, "F", 0)), turn[1].index(Action(2, "F", 0))
    turn[1][i], turn[1][j] = turn[1][j], turn[1][i]
    with pytest.raises(ValueError, match="2F0 runs before 1F0"):
        validate_schedule(turn, 2, 3, 2, "v")
    # a backward run twice over: both as one B and as I + W
    both = [list(good[0]) + [Action(3, "B", 0)], list(good[1])]
    with pytest.raises(ValueError, match="3B0: a backward is either one B or an I and a W"):
        validate_schedule(both, 2, 3, 2, "v")
    # a W dropped
    no_w = [[a for a in good[0] if a != Action(0, "W", 2)], list(good[1])]
    with pytest.raises(ValueError, match="missing 0W2"):
        validate_schedule(no_w, 2, 3, 2, "v")


@pytest.mark.parametrize("args,match", [
    (("zbv", 2, 4, 1), "two chunks per rank in a V .* set parallel.virtual_stages=2"),
    (("dualpipev", 2, 4, 3), "set parallel.virtual_stages=2"),
    (("dualpipev", 4, 7, 2), "dualpipev needs at least 2·pp = 8 micro-batches, got 7"),
])
def test_bad_v_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(*args)
