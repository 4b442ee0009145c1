"""A hung rank makes the job fail loudly: the waiting ranks time out after ``parallel.timeout_s``, say
which step and which action they were waiting on, and the job exits non-zero."""
import os
import signal

from tests.support.launch import SMALL_MODEL, start_torchrun

# The waiting ranks' timeout. The test pays it about twice per launch: once until rank 0 reports, and
# often again in the teardown (the frozen rank, continued, sits in its own collective until its timeout).
# It also bounds every wait before the freeze (the process group's rendezvous, the first steps), so it
# must outlast the skew between two ranks starting on a loaded 2-core machine: 5 s, not less.
TIMEOUT_S = 5


def _rank_of(pid: int) -> int:
    env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"])


def _launch_and_freeze_one_rank(run, overrides, nproc):
    proc, workers = start_torchrun(nproc, run, overrides, after_steps=2)
    frozen = next(pid for pid in workers if _rank_of(pid) == nproc - 1)  # the report is asserted on rank 0
    os.kill(frozen, signal.SIGSTOP)  # alive but silent: the hang a dead NIC or a stuck kernel looks like
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "failed in step" in line:
                break
    finally:
        os.kill(frozen, signal.SIGCONT)  # let torchrun's SIGTERM reach it
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(out) + rest


def test_hung_rank_times_out_names_its_wait_and_exits_nonzero(data_dir, tmp_path):
    code, out = _launch_and_freeze_one_rank(
        tmp_path, [*SMALL_MODEL, f"data.dir={data_dir}", "train.max_steps=100000", "parallel.dp=2",
                   f"parallel.timeout_s={TIMEOUT_S}"], nproc=2)
    assert code != 0, out[-3000:]
    line = next(l for l in out.splitlines() if "failed in step" in l)
    assert "rank 0 (pp 0, dp 0, tp 0)" in line and "while waiting on" in line and "Timed out" in line, line


def test_hung_pipeline_stage_names_the_schedule_action(data_dir, tmp_path):
    """The freeze lands at a random moment; with 16 micro-batches per step the first stage spends nearly
    all of it waiting inside the 1F1B schedule. Should it land in the short tail (the first stage already
    in the gradient-norm all-reduce) the report names that phase instead; then freeze again, once."""
    reports = []
    for attempt in range(2):
        code, out = _launch_and_freeze_one_rank(
            tmp_path / str(attempt), [*SMALL_MODEL, f"data.dir={data_dir}", "train.max_steps=100000",
                                      "parallel.pp=2", "train.global_batch_size=16", "parallel.micro_batch_size=1",
                                      f"parallel.timeout_s={TIMEOUT_S}"], nproc=2)
        assert code != 0, out[-3000:]
        line = next(l for l in out.splitlines() if "failed in step" in l)
        assert "rank 0 (pp 0, dp 0, tp 0)" in line and "Timed out" in line, line
        reports.append(line)
        if "pipeline action" in line:
            assert "of the 1f1b schedule" in line, line
            return
    raise AssertionError(f"no report named a pipeline action: {reports}")


def test_reporter_names_a_wait_that_makes_no_progress_and_only_that():
    """What covers NCCL, whose watchdog aborts the process instead of raising: the report comes from a
    thread once the description of the wait has not changed for most of the timeout."""
    import io
    import time

    from engine.hang import HangReporter

    out = io.StringIO()
    stuck = HangReporter(lambda: "step 3: pipeline action 0RB1 (for 0B1) of the 1f1b schedule", 1.0,
                         prefix="rank 0 (pp 0, dp 0, tp 0) ", report_after_s=0.3, poll_s=0.02, out=out).start()
    ticks = iter(range(10**9))
    moving = HangReporter(lambda: f"step {next(ticks)}", 1.0, report_after_s=0.3, poll_s=0.02, out=out).start()
    time.sleep(0.8)
    stuck.stop(), moving.stop()
    assert len(stuck.reports) == 1 and moving.reports == []   # reported once, not every poll
    assert stuck.reports[0].startswith("rank 0 (pp 0, dp 0, tp 0) no progress for ")
    assert "waiting on step 3: pipeline action 0RB1 (for 0B1) of the 1f1b schedule" in out.getvalue()


def test_on_cuda_the_report_names_the_action_the_gpu_has_not_finished():
    """Under NCCL the host runs ahead of the GPU; each action's completion event tells where the GPU is."""
    from engine.pipeline.runtime import PipelineRunner

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    runner = PipelineRunner.__new__(PipelineRunner)
    runner._events = [("0F0", Event(True)), ("0SF0", Event(True)), ("0RB0", Event(False)), ("0B0", Event(False))]
    assert runner.stuck_action() == "0RB0"
    runner._events = [("0F0", Event(True))]
    assert runner.stuck_action() is None
