#!/usr/bin/env bash
# The whole search: calib -> ptq -> sensitivity -> integer program -> selection -> final images -> report.
# Stages whose outputs are up to date are skipped; an interrupted stage resumes.
# Usage: shell/main.sh [RUN_DIR] [key=value ...]
#   RUN_DIR default outputs/tiny-sdxl; a new RUN_DIR uses $MPQ_CONFIG (default tiny-sdxl).
set -euo pipefail
run_dir="${1:-outputs/tiny-sdxl}"
shift || true
if [ -f "$run_dir/config.yaml" ]; then
  exec mpq run --base_path "$run_dir" "$@"
fi
exec mpq run --config "${MPQ_CONFIG:-tiny-sdxl}" --outdir "$run_dir" "$@"
