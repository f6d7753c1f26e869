#!/usr/bin/env bash
# All four sensitivity files (weight/act x sqnr/ssim) and the float floor (plots: `mpq report`):
#   RUN_DIR/sensitivity/{weight,act}_{sqnr,ssim}.yaml, RUN_DIR/sensitivity/float_floor.json
# Each is resumable on its own: re-run after a kill and it continues where it stopped.
# Usage: shell/get_sensitivity.sh [RUN_DIR] [key=value ...]   (RUN_DIR default: outputs/tiny-sdxl)
set -euo pipefail
run_dir="${1:-outputs/tiny-sdxl}"
shift || true
for kind in weight act; do
  for metric in sqnr ssim; do
    mpq sensitivity --base_path "$run_dir" --sensitivity_type "$kind" --metric "$metric" "$@"
  done
done
