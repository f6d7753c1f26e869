import numpy as np
import torch
from PIL import Image

from mpq.commands.main import main
from mpq.plan import write_layer_list, write_plan


def test_mixdq_plan_files_drive_generation(tiny_run, tmp_path, capsys):
    from mpq.calibration.checkpoint import read_manifest

    names = [layer["name"] for layer in read_manifest(tiny_run.ckpt)["layers"]]
    w_plan, a_plan, protect = (
        tmp_path / "weight_4.00_1.00.yaml",
        tmp_path / "act_8.00_1.00.yaml",
        tmp_path / "act_protect.pt",
    )
    write_plan(w_plan, {n: 4 for n in names})
    write_plan(a_plan, {n: 8 for n in names})
    write_layer_list(protect, names[:3])
    assert torch.load(protect) == names[:3]  # the MixDQ storage: a torch.save'd list
    out = tmp_path / "imgs"
    code = main(
        [
            "infer",
            "--base_path",
            str(tiny_run.root),
            "--config_weight_mp",
            str(w_plan),
            "--config_act_mp",
            str(a_plan),
            "--act_protect",
            str(protect),
            "--num_imgs",
            "2",
            "--image-dir",
            str(out),
        ]
    )
    assert code == 0
    assert "MSE vs FP" in capsys.readouterr().out
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    assert np.asarray(Image.open(files[0])).shape == (128, 128, 3)


def test_uniform_w8a8_images_are_close_to_fp_and_fp_plan_is_exact(tiny_run, tmp_path):
    for flags, name in (
        (["--weight-bits", "fp", "--act-bits", "fp"], "fp"),
        (["--weight-bits", "8", "--act-bits", "8"], "w8a8"),
    ):
        assert (
            main(
                [
                    "infer",
                    "--base_path",
                    str(tiny_run.root),
                    *flags,
                    "--num_imgs",
                    "4",
                    "--image-dir",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    fp_ref = np.asarray(Image.open(tiny_run.fp_images / "0000.png"), dtype=np.float64)
    same = np.asarray(Image.open(tmp_path / "fp" / "0000.png"), dtype=np.float64)
    w8 = np.asarray(Image.open(tmp_path / "w8a8" / "0000.png"), dtype=np.float64)
    assert np.array_equal(same, fp_ref)  # same seed, same batching, same machine: bit for bit
    assert 0 < np.abs(w8 - fp_ref).mean() < 5.0
