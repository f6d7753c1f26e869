"""Calibrate quant params for every candidate bit (W and A) into RUN/ckpt.safetensors.

python scripts/ptq.py --config sdxl-turbo.yaml --outdir outputs/sdxl-turbo --seed 42
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("ptq")
