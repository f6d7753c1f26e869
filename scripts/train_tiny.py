"""Train the embedded tiny SDXL-Turbo-architecture model (and its adherence judge) from scratch.

python scripts/train_tiny.py --outdir DIR [--device cuda] [--seed 0] [--unet-steps N ...]
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("train-tiny")
