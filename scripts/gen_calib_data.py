"""Record the FP denoiser's inputs/outputs per step and the FP reference images.

python scripts/gen_calib_data.py --config tiny-sdxl --outdir outputs/tiny-sdxl
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("calib")
