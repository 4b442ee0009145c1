"""Pipeline parallelism: schedules as data, proven before they run, and the runtime that executes them.

Dependencies point down this list; each module imports only those above it.

    actions.py     the IR: Action (stage, Kind, micro-batch), text form "1F3", the dependency rule
    lowering.py    compute orders -> lists with SF/RF/SB/RB placed; p2p batches and per-pair streams
    generators.py  gpipe, 1f1b, interleaved_1f1b, zb_h1; the one check of schedule arguments
    simulate.py    event simulation: lists + costs -> timeline, bubble, peak activations, ASCII chart
    validate.py    the proof (complete, ordered, NCCL-order consistent, deadlock-free) and
                   build_step_actions: a launch's lists, built and proven once
    weight_grad.py zero-bubble: the store that defers weight gradients from I to W, and the switch
                   (`enable_weight_grad_deferral`) the layers consult
    stages.py      layer ranges per stage, this rank's chunks, tied-embedding gradient exchange
    runtime.py     PipelineRunner: executes one rank's proven lists with batched non-blocking p2p
"""
from engine.pipeline.runtime import PipelineRunner
from engine.pipeline.stages import build_stage_chunks, stage_layer_ranges, sync_tied_grads
from engine.pipeline.validate import StepActions, build_step_actions

__all__ = ["PipelineRunner", "StepActions", "build_stage_chunks", "build_step_actions", "stage_layer_ranges",
           "sync_tied_grads"]
