"""The whole search as one command on the tiny model, with small sizes."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mpq.commands.main import main
from mpq.plan import read_layer_list, read_plan
from mpq.runner.files import read_records
from mpq.runner.rundir import RunDir
from mpq.search.candidates import read_candidates
from mpq.selection import BudgetBest, CurvePoint, is_refined, read_scores

from conftest import FULL_SMALL

STAGES = ("calib", "ptq", "sensitivity", "search", "select", "final", "report")


def run(capsys, run_dir):
    assert main(["run", "--config", "tiny-sdxl", "--outdir", str(run_dir), *FULL_SMALL]) == 0
    return capsys.readouterr().out


def stage_states(out):
    return {
        s: ("skipped" if f"[{s}] up to date, skipped" in out else "ran" if f"[{s}] running" in out else "?")
        for s in STAGES
    }


def test_whole_search_one_command(full_run, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(full_run[0].root, d)
    out = full_run[1]
    assert set(stage_states(out).values()) == {"ran"}
    for line in ("final plans:", "report:", "avg bits", "vs FP", "MSE vs FP images:", "prompt adherence"):
        assert line in out
    assert yaml.safe_load((d / "config.yaml").read_text())["name"] == "tiny-sdxl"
    assert json.loads((d / "calib" / "meta.json").read_text())["num_samples"] == 8
    assert len(list((d / "fp_images").glob("*.png"))) == 8 and (d / "ckpt.safetensors").is_file()
    rows = read_candidates(d / "candidates" / "pareto.csv")
    for kind in ("weight", "act"):
        for metric in ("sqnr", "ssim"):
            assert yaml.safe_load((d / "sensitivity" / f"{kind}_{metric}.yaml").read_text())
            assert (d / "report" / f"sensitivity_{kind}_{metric}.png").is_file()
        plans = {p.name for p in (d / "candidates" / kind).glob("*.yaml")}
        assert plans == {r.plan_file for r in rows if r.kind == kind and r.feasible}
        scores = read_scores(d / "selection" / f"{kind}_scores.csv")
        family = [s for s in scores if not is_refined(kind, s.plan_file)]  # selection's refined plan beside them
        assert {s.plan_file for s in family} == plans and [s.mse for s in scores] == sorted(s.mse for s in scores)
        # the family spans the whole range. Weights: the chosen plan is the best within the target budget, and the
        # budgets table gives the best at no more bytes for each named budget (here: the target, first).
        # Activations (target auto): the fewest bytes whose MSE is no worse than the plan with the most (A8)
        budgets = read_records(d / "selection" / f"{kind}_budgets.csv", BudgetBest, "")
        limit = budgets[0].budget_bytes
        chosen = next(s for s in scores if s.chosen)
        assert chosen.plan_file == budgets[0].plan_file
        if kind == "weight":
            assert max(s.bytes for s in scores) > limit > min(s.bytes for s in scores)
            assert chosen.mse == min(s.mse for s in scores if s.bytes <= limit)
            # refinement: from the family's best within the budget, each accepted move lowered the selection MSE
            # and stayed within the budget; the refined plan, scored like every candidate, is the chosen one
            log = json.loads((d / "selection" / "weight_refine.json").read_text())
            start = min((s for s in family if s.bytes <= limit), key=lambda s: s.mse)
            trail = log["trail"]
            assert log["start"] == start.plan_file and trail[0]["mse"] == pytest.approx(start.mse, rel=1e-6)
            assert all(b["mse"] < a["mse"] and b["bytes"] <= limit for a, b in zip(trail, trail[1:]))
            assert 1 <= log["evals"] <= 40 and len(trail) >= 2  # it improved on this run
            assert chosen.plan_file == log["plan_file"] and chosen.mse == pytest.approx(trail[-1]["mse"], rel=1e-6)
            assert chosen.mse < start.mse and chosen.bytes <= limit
            assert is_refined(kind, chosen.plan_file) and "weight plan refined" in out
        else:
            a8 = max(scores, key=lambda s: s.bytes)
            assert budgets[0].budget == "auto" and limit >= a8.bytes  # no fixed budget: every plan fits
            assert chosen.mse <= a8.mse and all(s.mse > a8.mse for s in scores if s.bytes < chosen.bytes)
        curve = read_records(d / "selection" / f"{kind}_curve.csv", CurvePoint, "")
        assert [p.bytes for p in curve] == sorted(p.bytes for p in curve) and chosen.plan_file in {
            p.plan_file for p in curve
        }
        assert all(a.mse > b.mse for a, b in zip(curve, curve[1:]))  # each point improves on the smaller budgets
        assert 0.0 < chosen.mse < 0.05 and 0.0 <= chosen.adherence <= 1.0
        final = read_plan(d / "selection" / f"final_{kind}.yaml")
        assert final == read_plan(RunDir(d).scored_plan(kind, chosen.plan_file))
    protect = read_layer_list(d / "selection" / "final_act_protect.pt")
    assert (
        sorted(protect) == sorted(read_layer_list(d / "candidates" / "act_protect.pt")) and len(protect) == 2
    )  # ceil(1% of 36) + ceil(1% of 87)
    assert not set(protect) & set(read_plan(d / "selection" / "final_act.yaml"))
    assert len(list((d / "generated_images").glob("*.png"))) == 4
    html = (d / "report" / "index.html").read_text()
    for src in re.findall(r"src='([^']+)'", html):
        assert (d / "report" / src).resolve().is_file(), src
    summary = json.loads((d / "report" / "summary.json").read_text())
    ev = summary["eval"]
    assert ev["FP"]["mse"] == 0.0 and ev["FP"]["adherence"]["all"] >= 0.75
    assert ev["W8A8"]["mse"] < ev["W4A8"]["mse"] and ev["W4A16"]["mse"] < ev["W2A16"]["mse"]  # fewer bits, more damage
    assert ev["W4A16"]["weight_bytes"] < ev["W8A8"]["weight_bytes"] < summary["fp_weight_bytes"]
    # the chosen plan's weight bytes, counted here from the checkpoint's layer shapes: packed codes + an fp16 scale
    # and offset per output channel, kernel position and input part (the default quantizer); FP layers at 4 bytes
    manifest = json.loads((d / "ckpt.json").read_text())
    wplan = read_plan(d / "selection" / "final_weight.yaml")
    counted = sum(
        -(-int(np.prod(e["shape"])) * wplan[e["name"]] // 8)
        + 2 * 2 * e["shape"][0] * int(np.prod(e["shape"][2:])) * (len(e["in_split"]) - 1)
        if e["name"] in wplan
        else 4 * int(np.prod(e["shape"]))
        for e in manifest["layers"]
    )
    assert summary["weight_bytes"] == counted <= ev["W4A16"]["weight_bytes"] * 1.0001  # the target: W4 bytes

    # the act candidates were scored on top of the chosen weight plan: the chosen act plan's selection image
    # is the image of the final plan
    act_choice = next(s for s in read_scores(d / "selection" / "act_scores.csv") if s.chosen).plan_file
    assert (
        main(
            [
                "infer",
                "--base_path",
                str(d),
                "--config_weight_mp",
                str(d / "selection" / "final_weight.yaml"),
                "--config_act_mp",
                str(d / "selection" / "final_act.yaml"),
                "--act_protect",
                str(d / "selection" / "final_act_protect.pt"),
                "--num_imgs",
                "4",
                "--image-dir",
                str(tmp_path / "check"),
            ]
        )
        == 0
    )
    for i in range(4):
        a = np.asarray(Image.open(tmp_path / "check" / f"{i:04d}.png"))
        assert np.array_equal(
            a,
            np.asarray(
                Image.open(d / "selection" / "images" / "act" / act_choice.replace(".yaml", "") / f"{i:04d}.png")
            ),
        )
    # re-running skips every stage
    assert set(stage_states(run(capsys, d)).values()) == {"skipped"}

    # deleting one artifact re-runs only what depends on it
    (d / "selection" / "final_act.yaml").unlink()
    states = stage_states(run(capsys, d))
    assert states == {
        "calib": "skipped",
        "ptq": "skipped",
        "sensitivity": "skipped",
        "search": "skipped",
        "select": "ran",
        "final": "ran",
        "report": "ran",
    }

    # same seed, same machine: identical final plans (a second run through selection)
    d2 = tmp_path / "again"
    assert main(["select", "--config", "tiny-sdxl", "--outdir", str(d2), *FULL_SMALL]) == 0
    for kind in ("weight", "act"):
        assert (d / "selection" / f"final_{kind}.yaml").read_text() == (
            d2 / "selection" / f"final_{kind}.yaml"
        ).read_text()

    # changing one of a stage's config keys makes that stage stale, nothing upstream (`mpq run` re-makes it and,
    # as above, what depends on it; the search is re-made here)
    from mpq.commands.stages import STAGES as REGISTRY

    cfg = RunDir(d).load_config(None, [*FULL_SMALL, "search.act.k_num=3"])
    states = {s: RunDir(d).stage_state(REGISTRY[s], cfg) for s in ("calib", "ptq", "sensitivity", "search")}
    assert states == {"calib": "fresh", "ptq": "fresh", "sensitivity": "fresh", "search": "stale"}
    assert main(["search", "--base_path", str(d), "search.act.k_num=3"]) == 0
    act_ks = {r.K for r in read_candidates(d / "candidates" / "pareto.csv") if r.kind == "act" and r.solved}
    assert len(act_ks - {math.inf}) == 3 and math.inf in act_ks  # k_num K values, and K free (the sweep's ends)


def test_selection_resumes_after_a_kill(full_run, tmp_path):
    """A select killed after scoring part of the weight candidates resumes from its partial file: the score tables
    and final plans equal the uninterrupted run's byte for byte."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import repo_root

    ref, d = full_run[0].root, tmp_path / "run"
    shutil.copytree(ref, d)
    shutil.rmtree(d / "selection")
    child = (
        "import os, signal, sys\nimport mpq.runner.sharded as s\nsave = s.write_json\n"
        "def stop_after(path, data):\n    save(path, data)\n"
        "    if '.weight_scores.partial' in str(path) and len(data['items']) >= 2:\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "s.write_json = stop_after\nfrom mpq.commands.main import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, "select", "--base_path", str(d)],
        cwd=repo_root(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "select ended before saving two scored plans"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sel = d / "selection"
    assert (sel / ".weight_scores.partial.json").is_file() and not (sel / "weight_scores.csv").exists()
    out = subprocess.run(
        [sys.executable, "-m", "mpq", "select", "--base_path", str(d)], cwd=repo_root(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[select] weight: resuming, 2 of" in out.stdout
    for f in ("weight_scores.csv", "act_scores.csv", "final_weight.yaml", "final_act.yaml", "final_act_protect.pt"):
        assert (d / "selection" / f).read_bytes() == (ref / "selection" / f).read_bytes(), f
    assert not list((d / "selection").glob(".*partial*"))


def test_the_sensitivity_method_keys_remake_sensitivity_and_what_follows(full_run, tmp_path, capsys):
    """sensitivity.method, .estimator and .hybrid_fraction are in the stage's one declaration: changing one makes
    the finished exact run's sensitivity stale, and `mpq run` re-makes it and every stage after it (never
    "up to date, skipped" with the other method's files); a bookkeeping key (how often progress is saved, the
    prefix cache's memory) changes nothing. Inside the stage each file's signature holds what its computation used:
    hybrid re-makes the SQNR files and keeps the exact SSIM files (its SSIM is the fast path's)."""
    from mpq.commands.stages import STAGES as REGISTRY

    ref, d = full_run[0], RunDir(tmp_path / "run")
    shutil.copytree(ref.root, d.root)
    for key in ("sensitivity.save_every_s=1", "sensitivity.cache_budget_mb=64"):
        assert d.stage_state(REGISTRY["sensitivity"], d.load_config(None, [key])) == "fresh", key
    for key in (
        "sensitivity.method=local",
        "sensitivity.method=naive",
        "sensitivity.estimator=local",
        "sensitivity.hybrid_fraction=0.5",
        "sensitivity.share_bits=never",
    ):
        assert d.stage_state(REGISTRY["sensitivity"], d.load_config(None, [key])) == "stale", key

    hybrid = ["sensitivity.method=hybrid", "sensitivity.estimator=local", "sensitivity.hybrid_fraction=0.02"]
    assert main(["run", "--config", "tiny-sdxl", "--outdir", str(d.root), *FULL_SMALL, *hybrid]) == 0
    out = capsys.readouterr().out
    assert stage_states(out) == dict.fromkeys(STAGES[:2], "skipped") | dict.fromkeys(STAGES[2:], "ran")
    assert "[sensitivity] up to date" not in out and "(hybrid, local)" in out
    for kind in ("weight", "act"):
        assert f"[sensitivity] {kind} sqnr: already made" not in out
        assert f"[sensitivity] {kind} ssim: already made" in out
        assert d.sensitivity_file(kind, "ssim").read_bytes() == ref.sensitivity_file(kind, "ssim").read_bytes()
        assert d.sensitivity_file(kind, "sqnr").read_bytes() != ref.sensitivity_file(kind, "sqnr").read_bytes()
        assert d.hybrid_report(kind, "sqnr").is_file()
    cfg = d.load_config(None, [*FULL_SMALL, *hybrid])
    assert all(d.stage_state(REGISTRY[s], cfg) == "fresh" for s in STAGES)
    # back to the exact method: stale again (the run would re-make the SQNR files)
    assert d.stage_state(REGISTRY["sensitivity"], d.load_config(None, ["sensitivity.method=fast"])) == "stale"


def test_every_quantizer_and_search_option_end_to_end(full_run, tmp_path, capsys):
    """One run with MixDQ's activation calibration, MSE weight scales, per-tensor weight scales, MixDQ's reference
    search, Pareto-only selection and act-protected layers' weights kept FP: each setting reaches the files."""
    from safetensors.torch import load_file

    d = tmp_path / "run"
    shutil.copytree(full_run[0].root, d)
    opts = [
        "quant.act.calibration=mixdq",
        "quant.weight.scale_method=mse",
        "quant.weight.granularity=tensor",
        "search.mode=reference",
        "select.pareto_only=true",
        "search.protect_weights=true",
    ]
    assert main(["run", "--config", "tiny-sdxl", "--outdir", str(d), *FULL_SMALL, *opts]) == 0
    out = capsys.readouterr().out
    assert stage_states(out) == dict.fromkeys(("calib",), "skipped") | dict.fromkeys(STAGES[1:], "ran")
    manifest = json.loads((d / "ckpt.json").read_text())
    assert manifest["weight_quant"]["scale_method"] == "mse" and manifest["weight_quant"]["granularity"] == "tensor"
    assert manifest["act_quant"]["calibration"] == "mixdq"
    ckpt, ref_ckpt = load_file(str(d / "ckpt.safetensors")), load_file(str(full_run[0].root / "ckpt.safetensors"))
    manifest_split = {e["name"]: e["in_split"] for e in manifest["layers"]}
    for key, t in ckpt.items():
        if key.endswith("::w_scale"):  # one scale per input part, shared by the output channels: one row
            n_parts = len(manifest_split[key.replace("::w_scale", "")]) - 1
            assert t.shape[1:] == (1, n_parts), key
    # MixDQ's loop observes with W8A8 on: the first layer sees the same input, the layers after it do not
    ranges = [k for k in ckpt if k.endswith("::a_range")]
    assert torch.equal(ckpt["model.conv_in::a_range"], ref_ckpt["model.conv_in::a_range"])
    assert sum(not torch.equal(ckpt[k], ref_ckpt[k]) for k in ranges) > len(ranges) // 2
    rows = read_candidates(d / "candidates" / "pareto.csv")
    assert {r.mode for r in rows} == {"reference"}
    for kind in ("weight", "act"):
        scored = {s.plan_file for s in read_scores(d / "selection" / f"{kind}_scores.csv")}
        assert scored == {r.plan_file for r in rows if r.kind == kind and r.feasible and r.pareto}
    protect = read_layer_list(d / "selection" / "final_act_protect.pt")
    wplan = read_plan(d / "selection" / "final_weight.yaml")
    assert protect and not set(protect) & set(wplan)  # the saved weight plan is the one that ran: protected weights FP
    summary = json.loads((d / "report" / "summary.json").read_text())
    counted = sum(
        -(-int(np.prod(e["shape"])) * wplan[e["name"]] // 8) + 2 * 2 * (len(e["in_split"]) - 1)  # scale + offset
        if e["name"] in wplan
        else 4 * int(np.prod(e["shape"]))
        for e in manifest["layers"]
    )
    assert summary["weight_bytes"] == counted and summary["weight_fp_layers"] == len(protect)


def test_report_picks_the_best_mixed_weight_plan_within_uniform_w4_bytes():
    from mpq.report.report import mixed_weight_pick
    from mpq.selection import Score

    def row(name: str, mse: float, nbytes: float) -> Score:
        return Score(name, "weight", mse, 0.9, 30.0, float("nan"), 4.0, nbytes)

    w4 = 1000.0
    rows = [
        row("over.yaml", 1e-6, 1001.0),
        row("fit_a.yaml", 3e-5, 999.0),
        row("fit_b.yaml", 2e-5, 990.0),
        row("tie.yaml", 2e-5, 980.0),
    ]
    assert mixed_weight_pick(rows, w4) == "tie.yaml"  # lowest MSE within the bytes; ties to fewer bytes; never over W4
    assert mixed_weight_pick([row("over.yaml", 1e-6, 1001.0)], w4) is None and mixed_weight_pick(rows, None) is None
