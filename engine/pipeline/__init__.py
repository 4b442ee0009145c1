"""Pipeline parallelism: schedules as data, a simulator, and the runtime that executes them.

    schedules.py  per-rank action lists for gpipe, 1f1b, interleaved_1f1b, zb_h1, and their validator
    simulate.py   action lists + costs -> timeline, bubble, peak activations, ASCII chart
    stages.py     layer ranges per stage, this rank's chunks, tied-embedding gradient exchange
    runtime.py    PipelineRunner: executes one rank's list with batched non-blocking p2p
"""
from engine.pipeline.runtime import PipelineRunner
from engine.pipeline.stages import build_stage_chunks, check_pipeline, stage_layer_ranges, sync_tied_grads

__all__ = ["PipelineRunner", "build_stage_chunks", "check_pipeline", "stage_layer_ranges", "sync_tied_grads"]
