"""The whole search as one command on the tiny model, with small sizes."""

import csv
import json
import re

import yaml

from mpq.cli import main
from mpq.plan import read_layer_list

SMALL = ["calib.num_samples=8", "sampling.batch_size=4", "calib.batch_size=8", "model.device=cpu", "sensitivity.num_images=4",
         "sensitivity.batch_size=8", "select.num_images=4", "infer.num_images=4", "search.sweep_steps=2", "search.weight.k_num=2",
         "search.act.k_num=2"]
STAGES = ("calib", "ptq", "sensitivity", "search", "select", "final", "report")


def run(capsys, run_dir):
    assert main(["run", "--config", "tiny-sdxl", "--outdir", str(run_dir), *SMALL]) == 0
    return capsys.readouterr().out


def stage_states(out):
    return {s: ("skipped" if f"[{s}] up to date, skipped" in out else "ran" if f"[{s}] running" in out else "?") for s in STAGES}


def test_whole_search_one_command(tmp_path, capsys):
    d = tmp_path / "run"
    out = run(capsys, d)
    assert set(stage_states(out).values()) == {"ran"}
    for line in ("final plans:", "report:", "avg bits", "vs FP16", "MSE vs FP images:"):
        assert line in out
    # every artifact exists and parses
    assert yaml.safe_load((d / "config.yaml").read_text())["name"] == "tiny-sdxl"
    assert json.loads((d / "calib" / "meta.json").read_text())["num_samples"] == 8
    assert len(list((d / "fp_images").glob("*.png"))) == 8 and (d / "ckpt.safetensors").is_file()
    for kind in ("weight", "act"):
        for metric in ("sqnr", "ssim"):
            assert yaml.safe_load((d / "sensitivity" / f"{kind}_{metric}.yaml").read_text())
            assert (d / "report" / f"sensitivity_{kind}_{metric}.png").is_file()
        plans = list((d / "candidates" / kind).glob("*.yaml"))
        assert plans and all(yaml.safe_load(p.read_text()) for p in plans)
        scores = list(csv.DictReader(open(d / "selection" / f"{kind}_scores.csv")))
        assert len(scores) == len(plans) and sum(r["chosen"] == "True" for r in scores) == 1
        assert all(float(r["mse"]) >= 0 and 0 < float(r["ssim"]) <= 1 and float(r["psnr"]) > 0 for r in scores)
        final = yaml.safe_load((d / "selection" / f"final_{kind}.yaml").read_text())
        chosen = next(r["plan_file"] for r in scores if r["chosen"] == "True")
        assert final == yaml.safe_load((d / "candidates" / kind / chosen).read_text())
        assert min(float(r["mse"]) for r in scores) == float(next(r for r in scores if r["chosen"] == "True")["mse"])
    assert list(csv.DictReader(open(d / "candidates" / "pareto.csv")))
    protect = read_layer_list(d / "selection" / "final_act_protect.pt")
    assert not set(protect) & set(yaml.safe_load((d / "selection" / "final_act.yaml").read_text()))
    assert len(list((d / "generated_images").glob("*.png"))) == 4
    html = (d / "report" / "index.html").read_text()
    for src in re.findall(r"src='([^']+)'", html):
        assert (d / "report" / src).resolve().is_file(), src
    summary = json.loads((d / "report" / "summary.json").read_text())
    assert 2 <= summary["weight_avg_bits"] <= 8 and summary["weight_bytes"] < summary["fp16_bytes"]

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
