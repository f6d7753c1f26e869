#!/usr/bin/env bash
# Images with the selected plans (and the act-protect list) into RUN_DIR/generated_images/.
# Usage: shell/final_mixed_precision_infer.sh [RUN_DIR] [key=value ...]   (RUN_DIR default: outputs/tiny-sdxl)
set -euo pipefail
run_dir="${1:-outputs/tiny-sdxl}"
shift || true
exec mpq final --base_path "$run_dir" "$@"
