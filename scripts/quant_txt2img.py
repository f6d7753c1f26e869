"""Generate images with a run's checkpoint: uniform bits or MixDQ plan files.

python scripts/quant_txt2img.py --base_path outputs/tiny-sdxl --weight-bits 4 --act-bits 8
python scripts/quant_txt2img.py --base_path RUN --config_weight_mp W.yaml --config_act_mp A.yaml --act_protect P.pt
"""

from mpq.commands.main import script_main

if __name__ == "__main__":
    script_main("infer")
