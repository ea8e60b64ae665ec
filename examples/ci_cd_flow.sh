#!/usr/bin/env bash
# The CI/CD flow for an adapter: train -> register -> gate -> staging -> production -> roll back.
# Each step is one command, and the registry's audit log records who did what, when, and the gate's
# result. Defaults use the built-in model and task; the tests run it on a tiny model:
#   BASE=path/to/model DATA=task:dates STEPS=80 bash examples/ci_cd_flow.sh
set -euo pipefail
BASE=${BASE:-smollm2-135m}
DATA=${DATA:-task:dates}
STEPS=${STEPS:-80}
OUT=${OUT:-runs/ci-cd}
PEFTKIT=${PEFTKIT:-peftkit}
export PEFTKIT_REGISTRY=${PEFTKIT_REGISTRY:-$OUT/registry}
common=(--base "$BASE" --data "$DATA" --max_steps "$STEPS" --progress false --overwrite)

# 1. Train two candidates and register each as a draft version of "dates".
$PEFTKIT train examples/dates_lora.yaml "${common[@]}" --output_dir "$OUT/run1" --register dates
$PEFTKIT train examples/dates_lora.yaml "${common[@]}" --output_dir "$OUT/run2" --lr 5e-4 --register dates

# 2. The gate production promotions must pass: better than nothing, and no worse than production.
$PEFTKIT registry gate dates "$DATA" --n "${GATE_N:-50}" --min-score "${MIN_SCORE:-0.5}" --margin 0.02 --base "$BASE"

# 3. Version 1 through staging to production (the gate runs here).
$PEFTKIT registry promote dates@1 --to staging
$PEFTKIT registry promote dates@1 --to production --reason "first release"

# 4. Version 2 replaces it; then a problem is found in production and it is rolled back.
$PEFTKIT registry promote dates@2 --to production --force --reason "hotfix, gate skipped on purpose"
$PEFTKIT registry rollback dates --reason "regression reported"

# 5. What happened, and a check that the registry is sound.
$PEFTKIT registry show dates
$PEFTKIT registry history dates
$PEFTKIT registry check
