"""Throughput, step-time breakdown, peak memory and peer-group overhead of mutualkd's training step.

`python -m benchmarks --help`. The harness drives the engine's own building blocks (config loader,
`trainer.build`, sampler, loader, optimizer, scheduler, Accelerate) and replicates one training step of
`mutualkd.engine.trainer.train` with timers at the phase boundaries; nothing is timed inside the engine.
"""
