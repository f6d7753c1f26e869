#!/usr/bin/env bash
# Score every candidate plan by image MSE vs FP; writes RUN_DIR/selection/{weight,act}_scores.csv, final_{weight,act}.yaml
# Usage: shell/mixed_precision_infer.sh [RUN_DIR] [key=value ...]   (RUN_DIR default: outputs/tiny-sdxl)
set -euo pipefail
run_dir="${1:-outputs/tiny-sdxl}"
shift || true
exec mpq select --base_path "$run_dir" "$@"
