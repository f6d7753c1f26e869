"""Precision traces (``mpq trace``): FP against FP is exact everywhere; one quantized layer is the first departure;
the end-to-end image error is the one ``mpq infer`` reports; dumps compare with themselves and name what is missing,
renamed or reshaped; an fp16 export shows its rounding per component."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from mpq.calibration.checkpoint import read_manifest
from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.final import run_infer
from mpq.plan import BitPlan
from mpq.trace import compare_dumps, read_trace, trace


def _names(run) -> list[str]:
    return [e["name"] for e in read_manifest(run.ckpt)["layers"]]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def w4a8_trace(tiny_run, tmp_path_factory):
    """A W4A8 trace of the tiny run, with a dump."""
    folder = tmp_path_factory.mktemp("trace")
    cfg = tiny_run.load_config(None)
    t = trace(cfg, tiny_run, BitPlan.uniform(_names(tiny_run), 4, 8), "W4A8", out=folder / "out", dump=folder / "dump")
    return t, folder


def test_fp_against_fp_is_exact_everywhere(tiny_run, tmp_path):
    cfg = tiny_run.load_config(None)
    t = trace(cfg, tiny_run, BitPlan.uniform(_names(tiny_run), None, None), "FP", out=tmp_path)
    for mode in ("end_to_end", "isolated"):
        rows = t["components"][mode] + t["layers"][mode]
        assert len(t["layers"][mode]) == len(_names(tiny_run)) * cfg.sampling.steps
        assert all(r["cos"] == 1.0 and r["sqnr_db"] == math.inf and r["max_abs"] == 0.0 for r in rows)
        assert t["first_departure"][mode] is None
    components = {r["component"] for r in t["components"]["end_to_end"]}
    assert {"text_encoder", "text_encoder_2", "latents", "unet", "scheduler", "vae"} <= components
    assert t["image"]["mse"] == 0.0 and t["fed_fp"]
    on_disk = read_trace(tmp_path / "trace.json")  # +inf survives the JSON file
    assert on_disk["layers"]["isolated"][0]["sqnr_db"] == math.inf
    assert (tmp_path / "trace_layers.png").is_file() and (tmp_path / "trace_components.png").is_file()


def test_one_quantized_layer_is_the_first_departure(tiny_run, tmp_path):
    cfg = tiny_run.load_config(None)
    fp = trace(cfg, tiny_run, BitPlan.uniform(_names(tiny_run), None, None), "FP", out=tmp_path / "fp")
    order = [r["name"] for r in fp["layers"]["isolated"] if r["step"] == 0]
    target = order[len(order) // 2]  # a layer in the middle of the execution order
    t = trace(cfg, tiny_run, BitPlan({target: 2}, {target: 4}), "one layer", out=tmp_path / "one")
    iso = t["layers"]["isolated"]
    assert t["first_departure"]["isolated"]["name"] == target
    assert [r["name"] for r in iso if r["mae"] > 0] == [target]  # in isolation, only that layer errs
    e2e = t["layers"]["end_to_end"]
    k = order.index(target)
    assert all(r["mae"] == 0 for r in e2e if r["order"] < k)  # every layer before it is exact
    assert t["first_departure"]["end_to_end"]["name"] == target
    assert any(r["mae"] > 0 for r in e2e if r["order"] > k)  # and its error flows downstream
    assert t["image"]["mse"] > 0


def test_end_to_end_image_error_is_the_one_infer_reports(tiny_run, w4a8_trace, tmp_path):
    t, _ = w4a8_trace
    cfg = tiny_run.load_config(None)
    result = run_infer(cfg, tiny_run, BitPlan.uniform(_names(tiny_run), 4, 8), tmp_path, 1)
    assert t["image"]["mse"] == pytest.approx(result["mse"], rel=1e-9, abs=0)
    assert t["image"]["mse"] > 0
    unet = [r for r in t["components"]["end_to_end"] if r["component"] == "unet"]
    assert len(unet) == cfg.sampling.steps and all(math.isfinite(r["sqnr_db"]) for r in unet)
    assert t["fed_fp"] and t["cost_generations"] > 1


def test_dump_compares_with_itself_and_names_what_differs(tiny_run, w4a8_trace, tmp_path):
    t, folder = w4a8_trace
    dump = folder / "dump"
    manifest = json.loads((dump / "manifest.json").read_text())
    names = [e["name"] for e in manifest["tensors"]]
    assert "latents/0/output" in names and any(n.startswith("unet/step000/input.") for n in names)
    code, out, _ = _cli("trace", "--compare", str(dump), str(dump))
    assert code == 0 and "PASS" in out

    # against an FP dump: the first tensor past the tolerance is the denoiser's output (its inputs are exact)
    cfg_args = ["--base_path", str(tiny_run.root), "--weight-bits", "fp", "--act-bits", "fp", "--no-layers"]
    code, _, err = _cli("trace", *cfg_args, "--out", str(tmp_path / "fp"), "--dump", str(tmp_path / "fpdump"))
    assert code == 0, err
    code, out, _ = _cli("trace", "--compare", str(dump), str(tmp_path / "fpdump"))
    assert code == 1 and "FAIL: first tensor past the tolerance: unet/step000/output" in out

    def damaged(edit) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(dump, copy)
        m = json.loads((copy / "manifest.json").read_text())
        edit(m["tensors"])
        (copy / "manifest.json").write_text(json.dumps(m))
        return copy

    missing = damaged(lambda ts: ts.pop(3))
    with pytest.raises(MpqError, match=f"tensor {names[3]} of .* is missing from .*copy"):
        compare_dumps(dump, missing)
    renamed = damaged(lambda ts: ts[5].update(name="unet/step000/input.renamed"))
    with pytest.raises(MpqError, match="tensor unet/step000/input.renamed of .* is missing from"):
        compare_dumps(renamed, dump)
    reshaped = damaged(lambda ts: ts[0].update(shape=[2, *ts[0]["shape"][1:]]))
    with pytest.raises(MpqError, match=f"tensor {names[0]}: shape"):
        compare_dumps(dump, reshaped)
    code, _, err = _cli("trace", "--compare", str(dump), str(tmp_path / "nothing"))
    assert code == 2 and "is not a trace dump" in err and len(err.strip().splitlines()) == 1


def test_fp16_export_shows_its_rounding_per_component(tiny_run, tmp_path):
    out = tmp_path / "export"
    code, _, err = _cli(
        "export", "--base_path", str(tiny_run.root), "--out", str(out), "--weight-bits", "8", "--act-bits", "8"
    )
    assert code == 0, err  # fp16 FP parts by default
    code, text, err = _cli(
        "trace", "--base_path", str(tiny_run.root), "--export", str(out), "--out", str(tmp_path / "t")
    )
    assert code == 0, err
    t = read_trace(tmp_path / "t" / "trace.json")
    rows = {r["id"]: r for r in t["components"]["isolated"]}
    text_encoder = rows["text_encoder/0"]
    assert text_encoder["mae"] > 0 and 40 < text_encoder["sqnr_db"] < math.inf  # fp16 weights: rounding only
    assert rows["vae/0"]["mae"] > 0
    assert "worst first" in text and "fed every component the exact FP inputs: yes" in text
    # the same export traced against another model of the same architecture (other weights): refused, not measured
    other = ["--config", "tiny-sdxl-random", "--base_path", str(tmp_path / "other"), "--prompt", "a red circle"]
    code, _, err = _cli("trace", *other, "--export", str(out), "--out", str(tmp_path / "t2"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "was exported from embedded:tiny-sdxl, not from this run's model (embedded:tiny-sdxl-random)" in err
    assert not (tmp_path / "t2").exists()


def test_trace_options_are_one_line_errors(tiny_run, tmp_path):
    run = ["--base_path", str(tiny_run.root), "--out", str(tmp_path)]
    for argv, needle in (
        ([*run, "--export", str(tmp_path), "--weight-bits", "4"], "drop the plan options"),
        ([*run, "--weight-bits", "4", "--layers", "no_such_layer"], "matches no layer"),
        ([*run, "--weight-bits", "4", "--layers", "("], "not a regular expression"),
        ([*run, "--export", str(tmp_path / "none")], "not an exported pipeline folder"),
        (["--out", str(tmp_path), "--weight-bits", "4"], "give --base_path"),
    ):
        code, _, err = _cli("trace", *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_report_includes_a_trace_when_one_exists(w4a8_trace, tmp_path):
    from mpq.report.report import trace_html
    from mpq.runner.rundir import RunDir

    _, folder = w4a8_trace
    run = RunDir(tmp_path / "run")
    assert trace_html(run) == ""
    shutil.copytree(folder / "out", run.root / "trace")
    section = trace_html(run)
    assert "Precision trace" in section and "unet/step000" in section and "W4A8" in section
    assert (run.report / "trace_layers.png").is_file() and (run.report / "trace_components.png").is_file()
