#!/usr/bin/env bash
# Issue 19, item 4 on two CPU cores: dice, sdm+dice and dual on the hippocampus, three seeds each, one budget
# (EPOCHS epochs of the cpu preset), one thread, bf16, one run at a time (the other core trains head-and-neck).
# Seeds outer, modes inner, so that a partial campaign still compares the modes on the same seeds.
# Rerunning resumes each run; a finished run is skipped. Tables: python docs/experiments/compare_modes.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/hippocampus}
EPOCHS=${EPOCHS:-30}
OUT=${OUT:-runs/compare}
PRECISION=${PRECISION:-bf16}  # fp32: the paired precision check of item 1 (PRECISION=fp32 OUT=runs/compare-fp32 SEEDS=0 MODES=dual)
SEEDS=${SEEDS:-0 1 2}
MODES=${MODES:-dice sdm dual}
common=(--split Resources/Splits/hippocampus.json --preset cpu --patch 32,48,32 --batch-size 2 --epochs "$EPOCHS"
        --validate-every 5 --threads 1 --device cpu --precision "$PRECISION" --optimizer adam --lr 5e-4 --lr-schedule poly
        --augment strong --foreground-fraction 0.33 --name hippocampus --finalize --tta)
declare -A mode_args=(
  [dice]="--mode dice --dice-reduction batch --ce-weight 1"
  [sdm]="--mode sdm+dice --sdm-normalization clip --sdm-scale 5 --heaviside-k 15"
  [dual]="--mode dual --sdm-normalization clip --sdm-scale 5 --sdm-weight 1 --dice-reduction batch --ce-weight 1"
)
mkdir -p "$OUT"
for seed in $SEEDS; do
  for mode in $MODES; do
    run="$OUT/$mode-s$seed"
    if [ -f "$run/best/model.json" ] && grep -q '"metrics"' "$run/best/model.json"; then continue; fi
    # shellcheck disable=SC2086
    python -m SDMOrganSegLib.cli train "$DATA" --out "$run" ${mode_args[$mode]} --seed "$seed" "${common[@]}" > "$run.out" 2>&1
  done
done
