"""Candidate selection: images per candidate plan, MSE vs FP; weights first, then activations.

python scripts/mixed_precision_infer.py --base_path outputs/tiny-sdxl
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("select")
