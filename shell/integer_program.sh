#!/usr/bin/env bash
# Candidate plans for weights and activations over the budget x K sweep:
#   RUN_DIR/candidates/{weight,act}/*.yaml, candidates/pareto.csv, candidates/act_protect.pt (plot: `mpq report`)
# Usage: shell/integer_program.sh [RUN_DIR] [key=value ...]   (RUN_DIR default: outputs/tiny-sdxl)
set -euo pipefail
run_dir="${1:-outputs/tiny-sdxl}"
shift || true
exec mpq search --base_path "$run_dir" "$@"
