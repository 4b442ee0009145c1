"""Hang reports that survive NCCL: a thread that says where this rank has been stuck.

With gloo a wait that outlasts ``parallel.timeout_s`` raises in the training thread, and
`engine.trainer.main` prints the step and the action it was waiting on. NCCL is different on both
counts: a ``wait()`` does not block the host (it only orders the GPU stream), so the training
thread runs ahead and stalls at the step's end; and when a collective times out, NCCL's watchdog
thread aborts the communicators and the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), so no Python
exception is ever raised. `HangReporter` covers both: it polls a description of where the rank is
(the host phase and, on CUDA, the first pipeline action whose completion event the GPU has not
reached, `PipelineRunner.stuck_action`) and, once that description has not changed for most of
the timeout, prints it, before NCCL's watchdog ends the process.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

REPORT_FRACTION = 0.9   # report after this share of parallel.timeout_s without progress


class HangReporter:
    def __init__(self, describe: Callable[[], str], timeout_s: float, *, prefix: str = "",
                 report_after_s: float | None = None, poll_s: float | None = None, out=None):
        self.describe = describe
        self.report_after_s = REPORT_FRACTION * timeout_s if report_after_s is None else report_after_s
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(5.0, self.report_after_s / 20))
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.out = out
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tandem-hang-reporter", daemon=True)

    def start(self) -> "HangReporter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.poll_s + 1)

    def _watch(self) -> None:
        last, since, reported = None, time.monotonic(), None
        while not self._stop.wait(self.poll_s):
            now, where = time.monotonic(), self.describe()
            if where != last:
                last, since = where, now
                continue
            if now - since >= self.report_after_s and reported != where:
                reported = where
                line = (f"{self.prefix}no progress for {now - since:.0f} s while waiting on {where} "
                        f"(parallel.timeout_s={self.timeout_s:g}; at the timeout the job is stopped)")
                self.reports.append(line)
                print(line, file=self.out or sys.stderr, flush=True)
