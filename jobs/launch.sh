#!/usr/bin/env bash
# Run a job file on the GPUs of this machine with DeepSpeed's launcher:
#   jobs/launch.sh JOB.toml [NUM_GPUS] [--set key=value ...]
# One GPU also works without a launcher: `distill train JOB.toml`. torchrun works the same way:
#   torchrun --nproc_per_node N -m distill.cli train JOB.toml
set -euo pipefail
job=${1:?usage: jobs/launch.sh JOB.toml [NUM_GPUS] [--set key=value ...]}
shift
gpus=1
if [[ $# -gt 0 && $1 != --* ]]; then gpus=$1; shift; fi
exec python -m deepspeed.launcher.runner --num_gpus "$gpus" --no_local_rank --module distill.cli train "$job" "$@"
