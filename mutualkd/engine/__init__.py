"""The Accelerate engine: training loop, evaluation, checkpoints, tracking, reports."""
