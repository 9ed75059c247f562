#!/usr/bin/env bash
# The ablation of docs/ablation.md: one backbone (cpu preset), one schedule, four losses, one split.
# Runs two trainings at a time with one thread each (2-core machine); rerunning resumes each run.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/hippocampus}
EPOCHS=${EPOCHS:-40}
common=(--split Resources/Splits/hippocampus.json --preset cpu --epochs "$EPOCHS" --lr-step 15 --batch-size 2
        --patch 32,48,32 --validate-every 5 --threads 1 --seed 0 --device auto --name hippocampus --finalize)
run() { sdmorganseg train "$DATA" --out "runs/ablation/$1" --mode "$1" "${common[@]}" > "runs/ablation/$1.out" 2>&1; }
mkdir -p runs/ablation
run sdm+dice & run dice & wait
run sdm & run l1+dice & wait
