"""Every artifact a stage reads is checked when read: damage is a one-line error naming the file and the fix."""

import shutil
from pathlib import Path

import pytest

from mpq.commands.main import main
from mpq.errors import MpqError

# (artifact, how it is damaged, the command that reads it)
CASES = [
    ("calib/meta.json", "{}", ["ptq", "--force"]),
    ("calib/step_000.safetensors", "truncated", ["ptq", "--force"]),
    ("fp_images/0000.png", "not an image", ["select", "--force"]),
    ("ckpt.safetensors", "truncated", ["sensitivity", "--force"]),
    ("sensitivity/weight_sqnr.yaml", "model.conv_in: [1.0]\n", ["search", "--force"]),
    ("sensitivity/act_ssim.yaml", ": : not yaml", ["search", "--force"]),
    ("candidates/pareto.csv", "kind,mode\nweight,mpq\n", ["select", "--force"]),
    ("candidates/act_protect.pt", "\x80garbage", ["select", "--force"]),
    ("selection/weight_scores.csv", "plan_file,kind\nx,weight\n", ["report", "--force"]),
    ("selection/final_weight.yaml", "model.conv_in: four\n", ["final", "--force"]),
    ("selection/final_act_protect.pt", "\x80garbage", ["final", "--force"]),
    ("config.yaml", "model: [unclosed", ["report"]),
]


@pytest.mark.parametrize("artifact,damage,command", CASES, ids=[c[0] for c in CASES])
def test_damaged_artifact_is_a_one_line_error(full_run, tmp_path, capsys, artifact, damage, command):
    run, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    target = copy / artifact
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.write_text(damage)
    code = main([command[0], "--base_path", str(copy), *command[1:]])
    out = capsys.readouterr().err
    assert code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("mpq: error:")]  # besides progress lines
    assert len(errors) == 1, out
    err = errors[0]
    assert artifact.split("/")[-1] in err, err
    assert any(fix in err for fix in ("delete", "re-run", "--force", "fix")), err


def test_a_damaged_output_is_made_again_by_run(full_run, tmp_path, capsys):
    """An output changed since its stage wrote it (here: the report's summary) is not trusted: `mpq run` re-makes
    that stage (its stamp holds the content hash of what it wrote), and the headline reads the new file."""
    import json

    copy = tmp_path / "run"
    shutil.copytree(full_run[0].root, copy)
    (copy / "report" / "summary.json").write_text('{"weight_bytes": 1}')
    assert main(["run", "--base_path", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "[report] running" in out and "[select] up to date" in out
    assert json.loads((copy / "report" / "summary.json").read_text())["weight_bytes"] > 1


def test_relative_run_directory_finds_its_own_files(tmp_path, monkeypatch):
    """The default run directory, outputs/<config name>, is relative: a stage must find what the last one wrote."""
    from mpq.runner.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    run = RunDir(Path("outputs") / "tiny")
    run.ckpt.parent.mkdir(parents=True)
    run.ckpt.write_bytes(b"x")
    (run.root / "calib").mkdir()
    assert run.require(run.ckpt, "run ptq").resolve() == (tmp_path / "outputs" / "tiny" / "ckpt.safetensors")
    assert run.require("calib", "run calib").resolve() == tmp_path / "outputs" / "tiny" / "calib"
    with pytest.raises(MpqError, match="outputs/tiny/final.yaml is missing; run select"):
        run.require("final.yaml", "run select")
