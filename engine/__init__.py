"""Tandem's distributed runtime: mesh, tensor and pipeline parallelism, optimizer, data, checkpoints, trainer."""
