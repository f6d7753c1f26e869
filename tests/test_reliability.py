"""Nothing lost, nothing silently wrong: users' files survive, provenance is checked, exports verify themselves, a
failed stage keeps the last good outputs, and bad input is one line."""

import json
import os
import shutil

import pytest
import torch

from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.runner.rundir import RunDir

from conftest import FULL_SMALL, SMALL


def copy_run(src: RunDir, dst) -> RunDir:
    shutil.copytree(src.root, dst)
    return RunDir(dst)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("mpq: error:") and not any("Traceback" in line for line in err), err
    return err[-1]


# ----------------------------------------------------------------------------- export never deletes what it did not
# make
def test_export_refuses_folders_it_did_not_make_and_replaces_its_own(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    base = ["export", "--base_path", str(run.root), "--format", "torchao", "--weight-bits", "8", "--act-bits", "8"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("my thesis")
    assert main([*base, "--out", str(precious)]) == 2
    assert "thesis.txt" in one_line_error(capsys) and (precious / "thesis.txt").read_text() == "my thesis"
    afile = tmp_path / "notes.txt"
    afile.write_text("notes")
    assert main([*base, "--out", str(afile)]) == 2
    assert "is a file" in one_line_error(capsys) and afile.read_text() == "notes"
    for target in (tmp_path, run.root, run.root / "calib", run.root / "fp_images" / "new"):  # contains / is / inside
        assert main([*base, "--out", str(target)]) == 2
        assert "run directory" in one_line_error(capsys)
    assert (run.root / "ckpt.safetensors").is_file() and (run.root / "calib" / "meta.json").is_file()
    # a new folder, then the same export again (replaced), then another format there: refused
    out = tmp_path / "enc"
    assert main([*base, "--out", str(out)]) == 0 and (out / "torchao_config.json").is_file()
    assert main([*base, "--out", str(out)]) == 0
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".enc.")]  # no temp or old folder left
    assert main([*base[:-4], "--format", "mpq", "--weight-bits", "8", "--out", str(out)]) == 2
    assert "not mpq" in one_line_error(capsys)
    # --overwrite: the user's explicit choice for a foreign folder (never for a file or the run)
    assert main([*base, "--out", str(precious), "--overwrite"]) == 0
    assert (precious / "torchao_config.json").is_file() and not (precious / "thesis.txt").exists()
    assert (tmp_path / "precious.replaced-1" / "thesis.txt").read_text() == "my thesis"  # set aside, never deleted
    assert main([*base, "--out", str(afile), "--overwrite"]) == 2 and afile.read_text() == "notes"
    capsys.readouterr()


# ----------------------------------------------------------------------------- provenance
def test_a_checkpoint_of_other_weights_is_refused_and_makes_ptq_stale(tiny_run, tmp_path, capsys):
    """Same architecture, other weights (the random tiny model): the checkpoint is not silently reused."""
    from mpq.calibration.ptq import run_ptq
    from mpq.calibration.record import run_calibration
    from mpq.commands.stages import STAGES
    from mpq.runner.config import load_config

    other = RunDir(tmp_path / "random")
    cfg_random = load_config("tiny-sdxl-random", SMALL)
    other.save_config(cfg_random)
    run_calibration(cfg_random, other)
    run_ptq(cfg_random, other)
    run = copy_run(tiny_run, tmp_path / "run")
    cfg = run.load_config()
    run.mark_done(STAGES["calib"], cfg, 0.0)
    run.mark_done(STAGES["ptq"], cfg, 0.0)
    assert run.stage_state(STAGES["ptq"], cfg) == "fresh"
    shutil.copy(other.ckpt, run.ckpt)
    assert run.stage_state(STAGES["ptq"], cfg) == "changed"  # `mpq run` re-makes it; single stages say so
    assert (
        main(["infer", "--base_path", str(run.root), "--weight-bits", "8", "--act-bits", "8", "--num_imgs", "1"]) == 2
    )
    assert "other weights" in one_line_error(capsys)
    # calibration data of another model is refused by PTQ too
    shutil.rmtree(run.calib)
    shutil.copytree(other.calib, run.calib)
    with pytest.raises(MpqError, match="recorded with another model"):
        run_ptq(cfg, run)


def test_a_copied_run_stays_fresh_and_a_missing_file_is_remade(full_run, tmp_path, capsys):
    run = copy_run(full_run[0], tmp_path / "copy")
    (run.sensitivity / "weight_ssim.yaml").unlink()
    (run.calib / "step_000.safetensors").unlink()
    assert main(["sensitivity", "--base_path", str(run.root), *FULL_SMALL]) == 0
    out = capsys.readouterr().out
    assert "[calib] running" in out and "[ptq] running" in out  # a file calibration made is gone: calibration re-made
    assert "weight sqnr: already made" in out and "act ssim: already made" in out  # content, not file times
    assert "weight ssim: already made" not in out and (run.sensitivity / "weight_ssim.yaml").is_file()


# ----------------------------------------------------------------------------- exports verify themselves
def test_a_damaged_or_edited_export_is_refused(tiny_run, tmp_path, capsys):
    import mpq

    run = copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "w8"
    assert (
        main(["export", "--base_path", str(run.root), "--out", str(out), "--weight-bits", "8", "--act-bits", "8"]) == 0
    )
    capsys.readouterr()
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    damaged = bytearray(good)
    damaged[-100] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(damaged))
    with pytest.raises(MpqError, match="checksum mismatch"):
        mpq.load_quantized(out)
    weights.write_bytes(good)
    cfg_path = out / "unet" / "config.json"
    config = json.loads(cfg_path.read_text())
    layer = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][layer]["w_bits"] = 5
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(MpqError, match=f"layer '{layer}' field 'w_bits' was changed after export"):
        mpq.load_quantized(out)
    config["quantization_config"]["layers"][layer]["w_bits"] = 8
    config["quantization_config"]["layers"][layer]["colour"] = "blue"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(MpqError, match="colour"):
        mpq.load_quantized(out)


def test_spec_fields_are_range_checked():
    from mpq.export.packed import PackedSpec

    ok = {"kind": "linear", "shape": [4, 8], "w_bits": 4, "a_bits": None, "in_split": [0, 8]}
    assert PackedSpec.from_dict(ok).w_bits == 4
    for key, value, word in (
        ("w_bits", 9, "1..8"),
        ("kind", "lstm", "linear or conv"),
        ("in_split", [0, 4], "input channels"),
        ("shape", [4], "positive dimensions"),
        ("speed", 1, "unknown field"),
    ):
        with pytest.raises(MpqError, match=word):
            PackedSpec.from_dict({**ok, key: value})


# ----------------------------------------------------------------------------- a failed stage keeps the last good
# outputs
def test_an_infeasible_sweep_keeps_the_candidates_and_names_the_range(full_run, tmp_path, capsys):
    run = copy_run(full_run[0], tmp_path / "run")
    before = {p: p.read_bytes() for p in run.candidates.rglob("*") if p.is_file()}
    assert (
        main(
            [
                "search",
                *("--base_path", str(run.root), "--kind", "weight", "--target_bitwidth", "2.0"),
                *FULL_SMALL,
                "search.sweep=target",  # a full sweep always has plans: MixDQ's sweep below every plan does not
                # (at 2 bits every layer is at its fewest, so content averages as many bits as quality: K 1, not 3)
                *("search.weight.k_min=3.0", "search.weight.k_max=3.0", "search.weight.k_num=1"),
            ]
        )
        == 2
    )
    err = one_line_error(capsys)
    assert "no weight plan" in err and "feasible:" in err and "search.weight.target_bitwidth" in err
    assert {p: p.read_bytes() for p in run.candidates.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- one line, never a traceback
def test_bad_inputs_are_one_line(tiny_run, tmp_path, capsys):
    tiny_run = copy_run(tiny_run, tmp_path / "run")  # the commands may lock it: leave the shared one untouched
    binary = tmp_path / "prompts.txt"
    binary.write_bytes("a red circle\n".encode("utf-16"))
    cases = [
        ["calib", "--config", "tiny-sdxl", "--outdir", str(tmp_path / "r1"), f"calib.prompts_file={binary}"],
        ["layers", "--config", "tiny-sdxl", "--meta", "quant.bits=[4,8"],
        ["calib", "--config", "tiny-sdxl", "--outdir", str(binary)],  # a file as the run directory
        ["calib", "--config", "tiny-sdxl", "--outdir", str(tmp_path / "r2"), "sampling.max_sequence_length=0"],
        ["layers", "--config", "tiny-sdxl", "--meta", "quant.bits=[4,16]"],
        ["infer", "--base_path", str(tiny_run.root), "--weight-bits", "16", "--num_imgs", "1"],
        ["sensitivity", "--base_path", str(tiny_run.root), "--nproc", "0"],
        ["sensitivity", "--base_path", str(tiny_run.root), "--nproc", str(64 * (os.cpu_count() or 1))],
        [
            "infer",
            "--base_path",
            str(tiny_run.root),
            "--image-dir",
            str(tiny_run.root / "fp_images"),
            "--num_imgs",
            "1",
        ],
        ["search", "--base_path", str(tiny_run.root), "--target_bitwidth", "3"],
    ]
    words = [
        "UTF-8",
        "not valid YAML",
        "is a file",
        "max_sequence_length",
        "2..8",
        "16 were not calibrated",
        "--nproc 0",
        "far above",
        "lies inside the run directory",
        "--kind",
    ]
    for argv, word in zip(cases, words, strict=True):
        assert main(argv) == 2, argv
        assert word in one_line_error(capsys), (argv, word)
    assert not (tmp_path / "r2").exists()  # refused before calibrating
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  id: [embedded:tiny-sdxl\n")
    assert main(["layers", "--config", str(bad), "--meta"]) == 2 and "line" in one_line_error(capsys)


def test_a_run_directory_that_cannot_be_written(tiny_run, tmp_path, capsys):
    """The lock file cannot be opened (here: a folder in its place): a writing command says so in one line; an export,
    which only reads the run, goes on."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run.root / ".lock").unlink(missing_ok=True)
    (run.root / ".lock").mkdir()
    assert main(["ptq", "--base_path", str(run.root), "--force"]) == 2
    assert "cannot be written" in one_line_error(capsys)
    out = tmp_path / "enc"
    assert (
        main(["export", "--base_path", str(run.root), "--format", "torchao", "--weight-bits", "8", "--out", str(out)])
        == 0
    )


def test_infer_writes_its_own_folder_never_a_stage_output(full_run, tmp_path, capsys):
    run = copy_run(full_run[0], tmp_path / "run")
    final = {p.name: p.read_bytes() for p in run.generated_images.iterdir()}
    assert main(["infer", "--base_path", str(run.root), "--num_imgs", "2"]) == 0  # infer.weight_bits/act_bits: 8/8
    assert "MSE vs FP images" in capsys.readouterr().out
    assert len(list(run.infer_images.glob("*.png"))) == 2
    assert {p.name: p.read_bytes() for p in run.generated_images.iterdir()} == final


# ----------------------------------------------------------------------------- every accepted width exports as priced
def test_odd_widths_pack_densely_and_cost_what_the_export_stores(tiny_run, tiny_cfg, tmp_path):
    """3/5/6/7-bit codes are packed into a bit stream: the export's layer weights equal the cost model's bytes for a
    plan with every width 2..8, and the loaded model draws the fake-quant images bit for bit (fp32)."""
    import numpy as np

    from mpq.calibration.ptq import calibrate
    from mpq.calibration.record import CalibData
    from mpq.cost import CostModel
    from mpq.export.mpq_format import denoiser_export, load_denoiser, weight_bytes_of
    from mpq.images import generate
    from mpq.layers import describe
    from mpq.models import denoiser_of, load_pipeline
    from mpq.plan import BitPlan
    from mpq.quant.model import PREFIX, QuantModel

    pipe = load_pipeline(tiny_cfg)
    qm = QuantModel(denoiser_of(pipe))
    widths = [2, 3, 4, 5, 6, 7, 8]
    calibrate(qm, CalibData.open(tiny_run), tiny_cfg, bits=widths, show=False)
    plan = BitPlan({n: widths[i % len(widths)] for i, n in enumerate(qm.names)}, {n: 8 for n in qm.names})
    tensors, qconfig = denoiser_export(qm, plan, torch.float32)
    expected = CostModel(4, 4, qm.weight_quant).plan_cost(plan, describe(qm, [])).weight_bytes
    assert weight_bytes_of(tensors, [n[len(PREFIX) :] for n in qm.names]) == expected
    # round trip through the file format, in fp32 (BOS rows cached, as `mpq export` does): the fake-quant images
    from mpq.export.mpq_format import capture_bos_rows

    tensors, qconfig = denoiser_export(qm, plan, torch.float32, capture_bos_rows(pipe, qm, tiny_cfg))
    folder = tmp_path / "unet"
    folder.mkdir()
    from mpq.export.mpq_format import integrity_metadata
    from mpq.runner.files import save_tensors, write_json

    config = json.loads(qm.denoiser.to_json_string())
    config["quantization_config"] = qconfig
    write_json(folder / "config.json", config)
    save_tensors(folder / "diffusion_pytorch_model.safetensors", tensors, metadata=integrity_metadata(tensors, qconfig))
    qm.apply(plan)
    ref = generate(pipe, ["a large red circle in the center on a white background"], [0], tiny_cfg, output_type="np")
    qm.set_fp()
    pipe.unet = load_denoiser(folder)
    out = generate(pipe, ["a large red circle in the center on a white background"], [0], tiny_cfg, output_type="np")
    np.testing.assert_array_equal(ref[0], out[0])


def test_finished_work_is_trusted_only_while_its_file_is_unchanged(tmp_path):
    """The done marker holds the signature and the artifact's content hash: an edited artifact is computed again,
    a finished one is read back; saved partial state is carried for items another rank count assigns elsewhere."""
    from mpq.export.mpq_format import tensors_digest
    from mpq.runner.sharded import ShardedWork

    art = tmp_path / "scores.csv"
    work = ShardedWork(tmp_path, "scores", "sig1", ["a", "b"])
    work.resume()
    work.state = {"a": 1}
    work.save(force=True)
    art.write_text("a,b\n")
    work.finish(art)
    assert ShardedWork(tmp_path, "scores", "sig1", ["a", "b"]).finished(art)
    assert not ShardedWork(tmp_path, "scores", "sig2", ["a", "b"]).finished(art)  # other settings
    art.write_text("a,b,c\n")
    assert not ShardedWork(tmp_path, "scores", "sig1", ["a", "b"]).finished(art)  # edited since
    again = ShardedWork(tmp_path, "scores", "sig1", ["a", "b"])
    again.state, again._others = {"b": 2}, {"a": 1}
    again.save(force=True)
    assert json.loads((tmp_path / ".scores.partial.json").read_text())["items"] == {"a": 1, "b": 2}
    assert tensors_digest({"x": torch.tensor(1.0)}) != tensors_digest({"x": torch.tensor(2.0)})  # 0-dim tensors too
