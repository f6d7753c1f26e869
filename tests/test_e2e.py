"""The whole search as one command on the tiny model, with small sizes."""

import json
import re
import shutil

import numpy as np
import yaml
from conftest import FULL_SMALL
from PIL import Image

from mpq.candidates import read_candidates
from mpq.cli import main
from mpq.plan import BitPlan, read_layer_list, read_plan
from mpq.rundir import RunDir
from mpq.selection import final_plan, read_scores

STAGES = ("calib", "ptq", "sensitivity", "search", "select", "final", "report")


def run(capsys, run_dir):
    assert main(["run", "--config", "tiny-sdxl", "--outdir", str(run_dir), *FULL_SMALL]) == 0
    return capsys.readouterr().out


def stage_states(out):
    return {s: ("skipped" if f"[{s}] up to date, skipped" in out else "ran" if f"[{s}] running" in out else "?") for s in STAGES}


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
        assert {s.plan_file for s in scores} == plans and sum(s.chosen for s in scores) == 1
        chosen = next(s for s in scores if s.chosen)
        assert chosen.mse == min(s.mse for s in scores) and 0.0 < chosen.mse < 0.05 and 0.0 <= chosen.adherence <= 1.0
        assert read_plan(d / "selection" / f"final_{kind}.yaml") == read_plan(d / "candidates" / kind / chosen.plan_file)
    protect = read_layer_list(d / "selection" / "final_act_protect.pt")
    assert sorted(protect) == sorted(read_layer_list(d / "candidates" / "act_protect.pt")) and len(protect) == 2  # ceil(1% of 36) + ceil(1% of 87)
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
    assert summary["weight_bytes"] == ev["chosen"]["weight_bytes"] <= ev["W4A16"]["weight_bytes"] * 1.0001  # the sweep tops out at W4

    # the act candidates were scored on top of the chosen weight plan: the chosen act plan's selection image
    # is the image of the final plan
    act_choice = next(s for s in read_scores(d / "selection" / "act_scores.csv") if s.chosen).plan_file
    assert main(["infer", "--base_path", str(d), "--config_weight_mp", str(d / "selection" / "final_weight.yaml"),
                 "--config_act_mp", str(d / "selection" / "final_act.yaml"), "--act_protect", str(d / "selection" / "final_act_protect.pt"),
                 "--num_imgs", "4", "--image-dir", str(tmp_path / "check")]) == 0
    for i in range(4):
        a = np.asarray(Image.open(tmp_path / "check" / f"{i:04d}.png"))
        assert np.array_equal(a, np.asarray(Image.open(d / "selection" / "images" / "act" / act_choice.replace(".yaml", "") / f"{i:04d}.png")))
    assert final_plan(RunDir(d)) == BitPlan.load(
        d / "selection" / "final_weight.yaml", d / "selection" / "final_act.yaml", d / "selection" / "final_act_protect.pt")

    # re-running skips every stage
    assert set(stage_states(run(capsys, d)).values()) == {"skipped"}

    # deleting one artifact re-runs only what depends on it
    (d / "selection" / "final_act.yaml").unlink()
    states = stage_states(run(capsys, d))
    assert states == {"calib": "skipped", "ptq": "skipped", "sensitivity": "skipped", "search": "skipped",
                      "select": "ran", "final": "ran", "report": "ran"}

    # same seed, same machine: identical final plans
    d2 = tmp_path / "again"
    run(capsys, d2)
    for kind in ("weight", "act"):
        assert (d / "selection" / f"final_{kind}.yaml").read_text() == (d2 / "selection" / f"final_{kind}.yaml").read_text()
