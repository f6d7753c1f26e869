"""Bit allocation by integer program (OR-Tools). MixDQ's flags work unchanged:

    python scripts/integer_program.py --mixed_precision_type weight --sensitivity_ssim W_SSIM.yaml \
        --sensitivity_sqnr W_SQNR.yaml --para_size_config W_SIZE.yaml --mixed_precision_config OUT_DIR
        --target_bitwidth 4

and the mpq form: python scripts/integer_program.py --base_path outputs/<run> [--mode mpq|reference] [--budget_mb X
--K 1.0]
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("search")
