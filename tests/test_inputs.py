"""Every number from the inputs it claims, every error naming the thing at fault and a fix that works: the classes of
issue probes (wrong references, silent clamps, misnamed files, bad model folders, configs building on mpq's, regexes
that never end), each tried where it can occur."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mpq.calibration.record import warn_implausible
from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.models.loader import WEIGHTS_DIR
from mpq.plan import plan_file, write_plan
from mpq.runner.config import load_config
from mpq.runner.patterns import search_names
from mpq.runner.rundir import RunDir
from mpq.trace.dump import FORMAT, compare_dumps


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert lines and lines[-1].startswith("mpq: error:") and "Traceback" not in err, err
    return lines[-1]


# ----------------------------------------------------------------------------- a model folder that is not one
def test_a_broken_model_folder_names_the_file_or_component(capsys, tmp_path):
    src = WEIGHTS_DIR / "tiny-sdxl"
    bad = tmp_path / "pipe"
    shutil.copytree(src, bad)
    (bad / "model_index.json").write_text((src / "model_index.json").read_text()[:40])  # truncated
    base = ["layers", "--config", "tiny-sdxl"]
    code, _, err = run_cli(capsys, *base, f"model.id={bad}")
    assert code == 2 and "model_index.json is not valid JSON" in one_line(err)
    shutil.copy(src / "model_index.json", bad / "model_index.json")
    shutil.rmtree(bad / "vae")
    code, _, err = run_cli(capsys, *base, f"model.id={bad}")
    assert code == 2 and "component 'vae' (AutoencoderKL)" in one_line(err) and "missing" in err
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"x")
    code, _, err = run_cli(capsys, *base, f"model.id={afile}")
    assert code == 2 and "is a file" in one_line(err)


# ----------------------------------------------------------------------------- a config building on mpq's own
def test_a_user_config_builds_on_a_shipped_one_and_a_missing_default_says_where(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - tiny-sdxl\n  - _self_\nname: mine\nsampling:\n  steps: 2\n")
    cfg = load_config(str(mine))
    assert cfg.name == "mine" and cfg.sampling.steps == 2 and cfg.model.id == "embedded:tiny-sdxl"
    mine.write_text("defaults:\n  - no-such-base\n  - _self_\n")
    with pytest.raises(MpqError, match=rf"looked up in {tmp_path}.*configs"):
        load_config(str(mine))


# ----------------------------------------------------------------------------- errors that name a fix that works
def test_a_width_outside_the_quantizer_names_fp(capsys, tiny_run):
    code, _, err = run_cli(capsys, "infer", "--base_path", tiny_run.root, "--weight-bits", "16", "--num_imgs", "1")
    line = one_line(err)
    assert code == 2 and "2..8" in line and "--weight-bits fp" in line and "quant.bits including" not in line


def test_a_plan_is_named_by_the_file_it_is_in(tmp_path):
    written = write_plan(tmp_path / "best.yaml", {"model.conv_in": "nf12"})
    assert written.name == "best.formats.yaml" and plan_file(tmp_path / "best.yaml") == written
    assert plan_file(tmp_path / "final_weight.yaml") == tmp_path / "final_weight.yaml"  # missing: MixDQ's name


# ----------------------------------------------------------------------------- numbers from the inputs they claim
def test_infer_never_scores_against_references_of_other_sampling(capsys, full_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(full_run[0].root, run.root)
    code, out, err = run_cli(capsys, "infer", "--base_path", run.root, "--num_imgs", "2", "sampling.steps=2")
    assert code == 0 and "MSE" not in out
    assert "no MSE against the FP images" in err and "sampling.steps: 1 -> 2" in err
    code, out, err = run_cli(capsys, "infer", "--base_path", run.root, "--num_imgs", "100000")
    assert code == 0 and "MSE vs FP images" in out
    assert "100000, but the run has 8 calibration prompts" in err and len(list(run.infer_images.glob("*.png"))) == 8


def test_a_long_prompt_is_noted_not_cut_silently(capsys, tmp_path):
    long = "a small red circle in the center on a white background " * 40
    code, out, err = run_cli(capsys, "generate", "--config", "tiny-sdxl", "--prompt", long, "--outdir", tmp_path / "g")
    assert code == 0 and "tokens; tokenizer reads the first 77 and ignores the rest" in err


def test_an_implausible_calibration_size_warns_before_any_model_call():
    msg = warn_implausible(load_config("tiny-sdxl", ["calib.num_samples=100000"]))
    assert msg is not None and "100,000" in msg and "GiB" in msg and "12,500 batches" in msg
    assert warn_implausible(load_config("tiny-sdxl")) is None


# ----------------------------------------------------------------------------- refused before the expensive work
def test_a_budget_no_plan_can_meet_is_refused_before_any_model_call(capsys, full_run, tmp_path, monkeypatch):
    """A target below every candidate is refused from the config alone (the candidates' fewest bits) or, when
    candidates from an earlier search are kept (`mpq select` alone), from their bytes: before the model is loaded,
    not after every candidate has been scored."""
    import csv

    import mpq.selection

    with pytest.raises(MpqError, match=r"search.weight.target_bitwidth' is 1.5; no weight plan averages fewer than 2"):
        load_config("tiny-sdxl", ["search.weight.target_bitwidth=1.5"])
    with pytest.raises(MpqError, match=r"search.act.target_bitwidth' is 3.5; no act plan averages fewer than 4"):
        load_config("tiny-sdxl", ["search.act.target_bitwidth=3.5"])
    with pytest.raises(MpqError, match=r"search.act.target_bitwidth' is 'most'; use average bits \(e.g. 4.0\) or auto"):
        load_config("tiny-sdxl", ["search.act.target_bitwidth=most"])
    for bad in ("select.refine_evals=-1", "select.refine_per_round=0"):
        with pytest.raises(MpqError, match=r"select.refine_evals must be >= 0 \(0: off\)"):
            load_config("tiny-sdxl", [bad])
    # auto: the top of the range in mpq mode (the budget is measured), MixDQ's 7.5 in reference mode
    from mpq.runner.config import target_bits

    assert target_bits(load_config("tiny-sdxl").search, "act", 8.0) == 8.0
    assert target_bits(load_config("tiny-sdxl", ["search.mode=reference"]).search, "act", 8.0) == 7.5

    run = tmp_path / "run"
    shutil.copytree(full_run[0].root, run)
    table = RunDir(run).candidate_table
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    weight = [r for r in rows if r["kind"] == "weight" and r["plan_file"]]
    smallest = min(float(r["bytes"]) for r in weight)
    kept = [r for r in rows if not (r["kind"] == "weight" and r["plan_file"] and float(r["bytes"]) == smallest)]
    with open(table, "w", newline="") as f:  # as an earlier search without the all-2-bit plan would have left it
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the budget was checked")

    monkeypatch.setattr(mpq.selection, "quantized_pipeline", no_model)
    code, _, err = run_cli(capsys, "select", "--base_path", run, "search.weight.target_bitwidth=2.0")
    line = one_line(err)
    assert code == 2 and "no weight candidate fits the target budget" in line and "the smallest is" in line, line


# ----------------------------------------------------------------------------- inputs that would hang or escape
def test_a_regex_that_backtracks_forever_is_refused():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" + "a" * 30 + "!"]
    with pytest.raises(MpqError, match="took over 0.5 s"):
        search_names(r"(a+)+$", names, "--layers", seconds=0.5)
    with pytest.raises(MpqError, match="not a regular expression"):
        search_names("(", names, "--layers")
    assert search_names("attn2", names, "--layers") == names


def test_a_dump_manifest_cannot_point_outside_its_folder(tmp_path):
    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.ones(2)}, str(secret))
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        entry = {"name": "t/x", "file": "../secret.safetensors", "key": "x", "shape": [2]}
        (d / "manifest.json").write_text(json.dumps({"format": FORMAT, "tensors": [entry]}))
    with pytest.raises(MpqError, match="outside the dump"):
        compare_dumps(tmp_path / "a", tmp_path / "b")


def test_a_read_only_run_still_infers_into_a_folder_outside_it(capsys, tiny_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.root, run.root)
    (run.root / ".lock").unlink(missing_ok=True)
    (run.root / ".lock").mkdir()  # the lock cannot be opened: as in a read-only run directory
    code, out, err = run_cli(
        capsys, "infer", "--base_path", run.root, "--weight-bits", "8", "--num_imgs", "1", "--image-dir", tmp_path / "i"
    )
    assert code == 0, err
    assert Path(tmp_path / "i" / "0000.png").is_file()
