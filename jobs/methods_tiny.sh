#!/usr/bin/env bash
# The tiny-domain method comparison on one GPU: every method at 1, 2 and 4 student steps, trained in parallel
# (each job stops itself after train.max_minutes), then all evaluated into eval/results/methods_tiny.json.
#   jobs/methods_tiny.sh train   # cd, cd+gan, dmd, dmd+gan, and regression students where $REGRESSION_JOB exists
#   jobs/methods_tiny.sh gan     # pure GAN, each from the regression student of its step count (else the teacher)
#   jobs/methods_tiny.sh eval [compare_methods options, e.g. --num 512]
# Environment: RUNS (default runs/methods), STEPS (default "1 2 4"), EXTRA (more --set overrides for every job),
# REGRESSION_JOB (default jobs/tiny_regression.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
runs=${RUNS:-runs/methods}
read -ra steps <<< "${STEPS:-1 2 4}"
read -ra extra <<< "${EXTRA:-}"
regression=${REGRESSION_JOB:-jobs/tiny_regression.toml}
mkdir -p "$runs/logs"
started=()

start() {  # NAME JOB STEPS [--set ...]: one training job in the background, its output in $runs/logs/NAME.log
  local name=$1 job=$2 count=$3
  shift 3
  python -m distill.cli train "$job" --set "method.student_steps=$count" --set "output.dir='$runs/$name'" \
    "$@" "${extra[@]}" > "$runs/logs/$name.log" 2>&1 &
  started+=("$name")
}

case "${1:-}" in
  train)
    for s in "${steps[@]}"; do
      for method in cd cd_gan dmd dmd_gan; do start "${method}_s$s" "jobs/tiny_$method.toml" "$s"; done
      if [[ -f $regression ]]; then start "regression_s$s" "$regression" "$s"; fi
    done ;;
  gan)
    for s in "${steps[@]}"; do
      source="$runs/regression_s$s/model"
      [[ -d $source ]] || { echo "no $source: gan_s$s starts from the teacher"; source=""; }
      start "gan_s$s" jobs/tiny_gan.toml "$s" --set "model.source='$source'"
    done ;;
  eval)
    shift
    shopt -s nullglob
    exec python -m eval.compare_methods "$runs"/{cd,cd_gan,dmd,dmd_gan,gan}_s*/model "$@" ;;
  *)
    echo "usage: $0 train|gan|eval [compare_methods options]" >&2
    exit 2 ;;
esac

failed=0
for pid in $(jobs -p); do wait "$pid" || failed=1; done
for name in "${started[@]}"; do echo "== $runs/logs/$name.log"; tail -n 2 "$runs/logs/$name.log"; done
exit $failed
