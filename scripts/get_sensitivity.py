"""Layer sensitivity, MixDQ flags: each layer quantized alone at each candidate bit.

python scripts/get_sensitivity.py --config tiny-sdxl --base_path outputs/tiny-sdxl --sensitivity_type weight --metric
sqnr
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("sensitivity")
