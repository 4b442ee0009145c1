"""Pipeline runtime against the serial model on gloo: loss and every gradient, memory, errors.

Messages go with tag 0 (matched in posting order, as NCCL does); every case checks that.

Several cases run inside one spawned world to keep the process start-up cost down.
"""
import pytest
import torch

from engine.pipeline import stage_layer_ranges
from tests.support.distributed import run_distributed
from tests.support.serial import serial_step

BASE = dict(dim=48, n_heads=6, n_kv_heads=2, ffn_dim=72, vocab_size=101, max_seq_len=32)
MB, T = 2, 8


def _runner(chunks, mesh, schedule: str, n_micro: int, virtual_stages: int = 1, **kwargs):
    """A runner over the proven lists the trainer would hand it (built here once per runner)."""
    from engine.pipeline import PipelineRunner, build_step_actions

    return PipelineRunner(chunks, mesh, build_step_actions(schedule, mesh.pp, n_micro, virtual_stages), **kwargs)


def _run_cases(rank, world, cases):
    from engine.mesh import build_mesh
    from engine.pipeline import build_stage_chunks, sync_tied_grads
    from models import ModelConfig, init_weights

    import dataclasses

    from engine.pipeline.generators import schedule_placement

    loop_mesh = build_mesh(pp=world)
    posted = _record_p2p_tags()
    out = []
    for case in cases:
        posted.clear()
        mesh = dataclasses.replace(loop_mesh, pp_placement=schedule_placement(case["schedule"]))
        cfg = ModelConfig(**BASE, n_layers=case["n_layers"], tie_embeddings=case.get("tied", False))
        m, v = case["m"], case.get("v", 1)
        tokens = torch.randint(0, cfg.vocab_size, (m * MB, T + 1), generator=torch.Generator().manual_seed(1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        serial, ref_loss = serial_step(cfg, x, y)
        chunks = build_stage_chunks(cfg, mesh, layers_per_stage=case.get("layers"), virtual_stages=v)
        for c in chunks:
            init_weights(c, seed=0, n_layers=cfg.n_layers, device="cpu")
        runner = _runner(chunks, mesh, case["schedule"], m, v, hidden_shape=(MB, T, cfg.dim))
        inputs = x if mesh.is_first_stage else None
        targets = y if mesh.is_last_stage else None
        with torch.no_grad():
            eval_loss = runner.forward_backward(inputs, targets, backward=False)
        loss = runner.forward_backward(inputs, targets)
        tags = list(posted)                 # the runner's ops, not sync_tied_grads' exchange
        sync_tied_grads(chunks, mesh)
        worst, names = 0.0, []
        for c in chunks:
            for name, p in c.named_parameters():
                ref = serial.get_parameter(name).grad
                torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=lambda s: f"{case} {name}: {s}")
                worst = max(worst, float((p.grad - ref).abs().max()))
                names.append(name)
        boundaries = sum(a.kind == "SF" for a in runner.actions) // m
        out.append({"boundaries": boundaries, "loss": None if loss is None else float(loss), "eval_loss": None if eval_loss is None else float(eval_loss),
                    "ref_loss": float(ref_loss), "worst": worst, "names": names, "live_peak": runner.live_peak,
                    "n_serial_params": len(list(serial.named_parameters())),
                    "serial_names": [n for n, _ in serial.named_parameters()], "tags": tags})
    return out


def _record_p2p_tags() -> list[int]:
    """Wrap batch_isend_irecv in this (spawned) process so the tag of every op posted lands in
    the returned list: the runtime must post tag 0 only, i.e. rely on ordered matching as NCCL does."""
    import torch.distributed as dist

    posted: list[int] = []
    post = dist.batch_isend_irecv

    def recording(ops):
        posted.extend(op.tag for op in ops)
        return post(ops)

    dist.batch_isend_irecv = recording
    return posted


def _runtime_errors(rank, world):
    """Bad runner input is a clear error before any communication."""
    from engine.mesh import build_mesh
    from engine.pipeline import PipelineRunner, build_stage_chunks, build_step_actions
    from models import ModelConfig, init_weights

    mesh = build_mesh(pp=world)
    cfg = ModelConfig(**BASE, n_layers=4)
    chunks = [init_weights(c, seed=0, n_layers=4, device="cpu") for c in build_stage_chunks(cfg, mesh)]
    messages = []
    for args in (("1f1b", 2, 2), ("interleaved_1f1b", 3, 1), ("looped", 2)):
        try:
            _runner(chunks, mesh, *args, hidden_shape=(MB, T, cfg.dim))
        except ValueError as e:
            messages.append(str(e))
    for actions in (build_step_actions("1f1b", 2 * world, 2), build_step_actions("gpipe", world, 2, 2)):
        try:
            PipelineRunner(chunks, mesh, actions, hidden_shape=(MB, T, cfg.dim))
        except ValueError as e:
            messages.append(str(e))
    runner = _runner(chunks, mesh, "1f1b", 2, hidden_shape=(MB, T, cfg.dim))
    wrong = torch.zeros(3 * MB, T, dtype=torch.long)
    try:
        runner.forward_backward(wrong if mesh.is_first_stage else None, wrong if mesh.is_last_stage else None)
    except ValueError as e:
        messages.append(str(e))
    return messages


def _memory_and_errors(rank, world, cases):
    return _run_cases(rank, world, cases), _runtime_errors(rank, world)


def _check(results, cases):
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        # the loss lives on the rank holding the last stage: pp-1, or rank 0 under a V (zbv, dualpipev)
        v_placed = case["schedule"] in ("zbv", "dualpipev")
        last = per_rank[0 if v_placed else -1]
        assert last["loss"] == pytest.approx(last["ref_loss"], rel=1e-5), case
        assert last["eval_loss"] == pytest.approx(last["ref_loss"], rel=1e-5), case
        assert all(r["loss"] is None for r in per_rank if r is not last)
        # every serial parameter is held (and was compared) somewhere, and by one chunk only except
        # the tied embedding, whose copy the last stage holds too
        held = [n for r in per_rank for n in r["names"]]
        serial = set(last["serial_names"])
        assert set(held) == serial and len(serial) == last["n_serial_params"], case
        twice = {"tok_embeddings.weight"} if case.get("tied") else set()
        assert {n: held.count(n) for n in serial} == {n: 2 if n in twice else 1 for n in serial}, case
        if case.get("tied"):
            assert held.count("tok_embeddings.weight") == 2
            if v_placed:   # both copies on rank 0, the holder of stage 0 and of the last stage
                assert per_rank[0]["names"].count("tok_embeddings.weight") == 2
        assert max(r["worst"] for r in per_rank) < 1e-5
        # tag 0 only (what NCCL effectively sees): a send and a receive per message, each message
        # once in the training step and activations once more in the forward-only step. Every stage
        # boundary crosses ranks except, in a V, the turn at the last rank (handed over in memory).
        n_stages = len(per_rank) * case.get("v", 1)
        crossings = n_stages - 1 - (1 if v_placed else 0)
        assert sum(r["boundaries"] for r in per_rank) == crossings, case
        n_msgs = case["m"] * crossings
        tags = [t for r in per_rank for t in r["tags"]]
        assert len(tags) == 2 * (2 * n_msgs + n_msgs) and set(tags) == {0}, case


PP2_CASES = [
    {"schedule": "gpipe", "n_layers": 3, "m": 3, "tied": True},
    {"schedule": "1f1b", "n_layers": 3, "m": 4, "tied": True},
    {"schedule": "1f1b", "n_layers": 3, "m": 3, "layers": [1, 2]},
    {"schedule": "zb_h1", "n_layers": 3, "m": 4, "tied": True},
    {"schedule": "interleaved_1f1b", "n_layers": 5, "m": 4, "v": 2, "layers": [2, 1, 1, 1], "tied": True},
    {"schedule": "gpipe", "n_layers": 4, "m": 2, "v": 2},
    # the V placement: rank 0 holds stages 0 and 3 (embedding and loss, both tied copies), rank 1
    # stages 1 and 2 (the turn, in memory)
    {"schedule": "zbv", "n_layers": 5, "m": 3, "v": 2, "layers": [2, 1, 1, 1], "tied": True},
    {"schedule": "dualpipev", "n_layers": 4, "m": 5, "v": 2},
    # flexible layouts (issue 15): an embedding-only first stage, a head-and-loss-only last stage
    # (zero-bubble: the tied head's deferred W on a stage without layers), interleaved with a
    # micro-batch count that is not a multiple of pp, and both at once
    {"schedule": "1f1b", "n_layers": 3, "m": 3, "layers": [0, 3]},
    {"schedule": "zb_h1", "n_layers": 3, "m": 3, "layers": [3, 0], "tied": True},
    {"schedule": "interleaved_1f1b", "n_layers": 4, "m": 3, "v": 2},
    {"schedule": "interleaved_1f1b", "n_layers": 3, "m": 5, "v": 2, "layers": [0, 2, 1, 0], "tied": True},
]


def test_every_schedule_matches_serial_at_pp2():
    _check(run_distributed(_run_cases, world_size=2, args=(PP2_CASES,)), PP2_CASES)


def _tp_case(case):
    """A tp×pp case's model config, micro-batch count, sequence-parallel flag, tokens and serial
    reference (the serial model after one step, and its loss)."""
    from models import ModelConfig

    cfg = ModelConfig(**{**BASE, **case.get("model", {})}, n_layers=case["n_layers"],
                      tie_embeddings=case.get("tied", False))
    m, sp = case["m"], case.get("sp", False)
    tokens = torch.randint(0, cfg.vocab_size, (m * MB, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    serial, ref_loss = serial_step(cfg, x, y)
    return cfg, m, sp, x, y, serial, ref_loss


def _tp_zero_bubble_cases(rank, world, cases):
    """tp=2 × pp=world/2 under zb_h1, each I and W traced: what the I stashed for its W, and which
    gradients each action changed. Then loss and every gradient, gathered to global shape, against
    the serial model."""
    from engine.mesh import build_mesh
    from engine.pipeline import build_stage_chunks, sync_tied_grads
    from engine.tensor_parallel import ColumnParallelLinear, RowParallelLinear, parallelize, sync_tp_grads
    from engine.recompute import apply_recompute
    from models import init_weights
    from models.shard import iter_params
    from tests.parallel.test_tensor_parallel import _gather_global

    mesh = build_mesh(tp=2, pp=world // 2)
    out = []
    for case in cases:
        cfg, m, sp, x, y, serial, ref_loss = _tp_case(case)
        (chunk,) = build_stage_chunks(cfg, mesh, layers_per_stage=case.get("layers"))
        parallelize(chunk, mesh, sequence_parallel=sp)
        init_weights(chunk, seed=0, n_layers=cfg.n_layers, device="cpu")
        apply_recompute(chunk, case.get("recompute", "none"))
        runner = _runner([chunk], mesh, "zb_h1", m,
                         hidden_shape=(MB, T // mesh.tp if sp else T, cfg.dim))
        params = dict(chunk.named_parameters())
        name_of = {id(p): n for n, p in params.items()}
        deferred = {f"{n}.weight" for n, mod in chunk.named_modules()
                    if isinstance(mod, (ColumnParallelLinear, RowParallelLinear))}
        if cfg.tie_embeddings and mesh.is_last_stage:
            deferred.add("tok_embeddings.weight")

        def snap():
            return {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}

        def changed(before, after):
            return {n for n in before if (before[n] is None) != (after[n] is None)
                    or (before[n] is not None and not torch.equal(before[n], after[n]))}

        events, run_I, run_W = [], runner._run_I, runner._run_W

        def traced_I(a):
            before = snap()
            run_I(a)
            pending = runner.store.pending[(a.mb, a.stage)]
            stash = sorted(name_of[id(w)] for w, _, _ in pending)
            # column-parallel inputs come to the W as the full sequence (re-gathered under SP)
            col_seq = {x.shape[1] for w, x, _ in pending if name_of[id(w)].endswith(("wq.weight", "w1.weight"))}
            assert col_seq == ({T} if chunk.layers else set()), (case, col_seq)
            events.append(("I", a.mb, stash, changed(before, snap())))

        def traced_W(a):
            before = snap()
            run_W(a)
            left = sorted(name_of[id(w)] for w, _, _ in runner.store.pending.get((a.mb, a.stage), []))
            events.append(("W", a.mb, left, changed(before, snap())))

        runner._run_I, runner._run_W = traced_I, traced_W
        loss = runner.forward_backward(x if mesh.is_first_stage else None, y if mesh.is_last_stage else None)
        sync_tp_grads([chunk], mesh)
        sync_tied_grads([chunk], mesh)
        grads = _gather_global({n: (p.grad, meta) for n, p, meta in iter_params(chunk)}, mesh.tp_group)
        worst = 0.0
        for name, g in grads.items():
            ref = serial.get_parameter(name).grad
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=lambda s: f"{case} {name}: {s}")
            worst = max(worst, float((g - ref).abs().max()))
        out.append({"loss": None if loss is None else float(loss), "ref_loss": float(ref_loss), "worst": worst,
                    "names": sorted(grads), "params": set(params), "deferred": deferred, "events": events,
                    "serial_names": sorted(n for n, _ in serial.named_parameters())})
    return out


def _tp_v_cases(rank, world, cases):
    """tp=2 × pp=2 under the V schedules: two chunks per rank (rank 0: embedding and head, both tied
    copies vocab-sharded), loss and every gradient gathered to global shape against serial."""
    import dataclasses

    from engine.mesh import build_mesh
    from engine.pipeline import build_stage_chunks, sync_tied_grads
    from engine.recompute import apply_recompute
    from engine.tensor_parallel import parallelize, sync_tp_grads
    from models import init_weights
    from models.shard import iter_params
    from tests.parallel.test_tensor_parallel import _gather_global

    base = build_mesh(tp=2, pp=world // 2)
    out = []
    for case in cases:
        mesh = dataclasses.replace(base, pp_placement="v")
        cfg, m, sp, x, y, serial, ref_loss = _tp_case(case)
        chunks = build_stage_chunks(cfg, mesh, layers_per_stage=case.get("layers"), virtual_stages=2)
        for c in chunks:
            parallelize(c, mesh, sequence_parallel=sp)
            init_weights(c, seed=0, n_layers=cfg.n_layers, device="cpu")
            apply_recompute(c, case.get("recompute", "none"))
        runner = _runner(chunks, mesh, case["schedule"], m, 2, hidden_shape=(MB, T // mesh.tp if sp else T, cfg.dim))
        loss = runner.forward_backward(x if mesh.is_first_stage else None, y if mesh.is_last_stage else None)
        sync_tp_grads(chunks, mesh)
        sync_tied_grads(chunks, mesh)
        grads = _gather_global({n: (p.grad, meta) for c in chunks for n, p, meta in iter_params(c)}, mesh.tp_group)
        worst = 0.0
        for name, g in grads.items():
            ref = serial.get_parameter(name).grad
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=lambda s: f"{case} {name}: {s}")
            worst = max(worst, float((g - ref).abs().max()))
        out.append({"loss": None if loss is None else float(loss), "ref_loss": float(ref_loss), "worst": worst,
                    "names": sorted(grads), "serial_names": sorted(n for n, _ in serial.named_parameters())})
    return out


def _world4(rank, world, pp4_cases, tp_cases, tp_v_cases):
    return (_run_cases(rank, world, pp4_cases), _tp_zero_bubble_cases(rank, world, tp_cases),
            _tp_v_cases(rank, world, tp_v_cases))


PP4_CASES = [
    {"schedule": "interleaved_1f1b", "n_layers": 8, "m": 4, "v": 2, "tied": True},
    # m = 8: rank 2 receives activations of two chunks (micro-batches 3 and 4) in one batch, which
    # must come in rank 1's send order now that messages carry no tags
    {"schedule": "interleaved_1f1b", "n_layers": 8, "m": 8, "v": 2},
    {"schedule": "zb_h1", "n_layers": 5, "m": 5, "tied": True},
    # V placement at pp4: 8 stages, odd layer count and a micro-batch count below 2p-1 (ZB-V's ramp
    # does not fill), and DualPipeV at its minimum of 2p micro-batches
    {"schedule": "zbv", "n_layers": 9, "m": 5, "v": 2, "layers": [1, 1, 1, 2, 1, 1, 1, 1], "tied": True},
    {"schedule": "dualpipev", "n_layers": 8, "m": 8, "v": 2},
    # flexible layouts: both ends empty (Llama 3's lighter end stages, taken to zero), and
    # interleaved with 6 micro-batches over 4 ranks (one round of 6) and empty end chunks
    {"schedule": "1f1b", "n_layers": 3, "m": 4, "layers": [0, 2, 1, 0], "tied": True},
    {"schedule": "interleaved_1f1b", "n_layers": 6, "m": 6, "v": 2, "layers": [0, 1, 1, 1, 1, 1, 1, 0]},
]
# tp=2 × pp=2 zb_h1 over 3 layers (stages of 2 and 1): GQA with split KV heads and the
# column-parallel output head; then sequence parallelism with the tied vocab-parallel head, one KV
# head replicated on both tp ranks, and full recomputation (saved inputs come back recomputed);
# then sequence parallelism with selective recomputation: the I re-gathers the MLP's saved
# sequence shard (the attention's checkpoint keeps its gathered input) and stashes it for the W.
TP_ZB_CASES = [
    {"n_layers": 3, "m": 4},
    {"n_layers": 3, "m": 4, "sp": True, "tied": True, "model": {"n_kv_heads": 1}, "recompute": "full"},
    {"n_layers": 3, "m": 4, "sp": True, "recompute": "selective"},
    # flexible layouts under tp × pp with SP: the vocab-parallel embedding alone on the first stage
    # (its output is the sequence shard the next stage receives), then the head alone on the last
    {"n_layers": 3, "m": 3, "sp": True, "tied": True, "layers": [0, 3]},
    {"n_layers": 3, "m": 3, "sp": True, "layers": [3, 0]},
]


# tp=2 × pp=2 on the V: ZB-V with sequence parallelism, the tied vocab-parallel head (both copies on
# rank 0), one KV head replicated on both tp ranks and full recompute; DualPipeV untied, GQA split
TP_V_CASES = [
    {"schedule": "zbv", "n_layers": 5, "layers": [2, 1, 1, 1], "m": 3, "sp": True, "tied": True,
     "model": {"n_kv_heads": 1}, "recompute": "full"},
    {"schedule": "dualpipev", "n_layers": 4, "m": 4},
]


@pytest.fixture(scope="module")
def world4():
    """One 4-process world: pp=4 schedules, then tp=2 × pp=2 zero-bubble and the V schedules."""
    return run_distributed(_world4, world_size=4, args=(PP4_CASES, TP_ZB_CASES, TP_V_CASES))


def test_interleaved_and_zero_bubble_match_serial_at_pp4(world4):
    _check([pp4 for pp4, _, _ in world4], PP4_CASES)


def test_tp2_pp2_v_schedules_match_serial(world4):
    for i, case in enumerate(TP_V_CASES):
        per_rank = [tpv[i] for _, _, tpv in world4]
        for r in per_rank[:2]:   # pp rank 0 holds the last stage under the V
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), case
        assert all(r["loss"] is None for r in per_rank[2:])
        assert per_rank[0]["names"] == per_rank[1]["names"] and per_rank[2]["names"] == per_rank[3]["names"], case
        outer, inner = set(per_rank[0]["names"]), set(per_rank[2]["names"])
        assert outer | inner == set(per_rank[0]["serial_names"]) and not outer & inner, case
        assert {"tok_embeddings.weight", "norm.weight"} <= outer
        assert max(r["worst"] for r in per_rank) < 1e-5


def test_tp2_pp2_zero_bubble_defers_tensor_parallel_weight_grads(world4):
    """Each I stashes one entry per column/row-parallel weight (and the tied head's copy) and leaves
    their .grad as it was, while norms and embedding lookups get theirs; the W writes exactly the
    deferred ones and empties the stash."""
    for rank, (_, results, _) in enumerate(world4):
        for case, res in zip(TP_ZB_CASES, results):
            deferred, events = res["deferred"], res["events"]
            if any(n.startswith("layers.") for n in res["params"]):   # not an embedding- or head-only stage
                assert any(n.endswith("wq.weight") for n in deferred) and any(n.endswith("w2.weight") for n in deferred)
            else:
                assert res["params"] <= {"tok_embeddings.weight", "norm.weight", "output.weight"}, (rank, case)
            if rank >= 2:  # last stage: the vocab-parallel head, tied or not
                assert ("tok_embeddings.weight" if case.get("tied") else "output.weight") in deferred
            assert [e[:2] for e in events if e[0] == "I"] == [("I", mb) for mb in range(case["m"])]
            assert sorted(e[1] for e in events if e[0] == "W") == list(range(case["m"]))
            for kind, mb, stash, changed in events:
                if kind == "I":
                    assert stash == sorted(deferred), (rank, case, mb)
                    assert changed == res["params"] - deferred, (rank, case, mb)
                else:
                    assert stash == [] and changed == deferred, (rank, case, mb)


def test_tp2_pp2_zero_bubble_matches_serial(world4):
    for i, case in enumerate(TP_ZB_CASES):
        per_rank = [tp[i] for _, tp, _ in world4]
        for r in per_rank[2:]:
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), case
        assert all(r["loss"] is None for r in per_rank[:2])
        # both tp ranks of a stage hold (and compared) the same parameters; the two stages together
        # hold every serial parameter, one stage each except the tied embedding
        assert per_rank[0]["names"] == per_rank[1]["names"] and per_rank[2]["names"] == per_rank[3]["names"], case
        first, last = set(per_rank[0]["names"]), set(per_rank[2]["names"])
        assert first | last == set(per_rank[0]["serial_names"]), case
        assert first & last == ({"tok_embeddings.weight"} if case.get("tied") else set()), case
        assert max(r["worst"] for r in per_rank) < 1e-5


MEMORY_CASES = [
    {"schedule": "1f1b", "n_layers": 2, "m": 6},
    {"schedule": "gpipe", "n_layers": 2, "m": 6},
    {"schedule": "zb_h1", "n_layers": 2, "m": 6},
]


def test_activations_are_released_within_the_schedule_bound_and_bad_input_is_refused():
    """live_peak counts stage outputs still referenced (weak references), so a buffer the runtime
    forgot to drop would show up here. 1F1B: rank r holds at most pp - r; GPipe holds all m."""
    both = run_distributed(_memory_and_errors, world_size=2, args=(MEMORY_CASES,))
    results = [r for r, _ in both]
    assert [r[0]["live_peak"] for r in results] == [2, 1]
    assert [r[1]["live_peak"] for r in results] == [6, 6]
    assert max(r[2]["live_peak"] for r in results) <= 2
    # same world: bad runner input is a clear error before any communication
    for _, messages in both:
        assert len(messages) == 6
        assert "1f1b runs one chunk per rank but parallel.virtual_stages=2" in messages[0]
        assert "interleaved_1f1b needs parallel.virtual_stages >= 2 (got 1)" in messages[1]
        assert "unknown pipeline schedule 'looped'; known schedules: gpipe, 1f1b, interleaved_1f1b, zb_h1" in messages[2]
        assert "action lists built for pp=4 given to a mesh with pp=2" in messages[3]
        assert "got 1 model chunks for virtual_stages=2" in messages[4]
        assert "expects" in messages[5] and "2 micro-batches × 2 rows, got (6, 8)" in messages[5]


@pytest.mark.parametrize("args,match", [
    ((3, 4, 1, None), "4 stages but the model has only 3 layers"),
    ((5, 2, 1, [2, 2]), r"layers_per_stage=\[2, 2\] sums to 4, not the model's n_layers=5"),
    ((5, 2, 1, [5]), "has 1 entries but the pipeline has pp=2"),
    ((4, 3, 1, [2, 0, 2]), r"gives stage 1 no layers; only the first stage \(embedding only\) and the last"),
    ((5, 2, 2, [0, 3, 0, 2]), "gives stage 2 no layers"),
    ((4, 2, 1, [5, -1]), "has a negative count"),
    ((6, 2, 2, None), "n_layers=6 does not divide into pp=2 × virtual_stages=2"),
])
def test_bad_layouts_are_clear_errors(args, match):
    with pytest.raises(ValueError, match=match):
        stage_layer_ranges(*args)


def test_default_split_is_even_with_earlier_stages_taking_the_rest():
    assert stage_layer_ranges(3, 2) == [(0, 2), (2, 3)]
    assert stage_layer_ranges(8, 4, 2) == [(i, i + 1) for i in range(8)]
    assert stage_layer_ranges(5, 2, 2, [2, 1, 1, 1]) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    # empty end stages: the embedding alone first, the head and loss alone last
    assert stage_layer_ranges(3, 2, 1, [0, 3]) == [(0, 0), (0, 3)]
    assert stage_layer_ranges(4, 3, 1, [0, 4, 0]) == [(0, 0), (0, 4), (4, 4)]
