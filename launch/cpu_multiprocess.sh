#!/usr/bin/env bash
# N processes on one CPU machine (gloo). ACCELERATE_USE_CPU=1 is required: without it the processes each
# believe they are alone and train duplicates. One intra-op thread per process avoids oversubscription.
# Use: NPROC=2 launch/cpu_multiprocess.sh [CONFIG.yaml] [key=value ...] [--run-dir DIR]
set -euo pipefail
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" -m mutualkd train "$@"
