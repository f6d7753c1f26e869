"""Bad input is a one-line error naming the fix, never a traceback."""

import pytest

from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.runner.config import load_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_config_lists_available(capsys):
    code, err = run_cli(capsys, "layers", "--config", "no-such-model", "--meta")
    assert code == 2 and len(err.splitlines()) == 1
    assert "sdxl-turbo" in err and "tiny-sdxl" in err


def test_bad_config_key_is_named(capsys):
    code, err = run_cli(capsys, "layers", "--config", "tiny-sdxl", "--meta", "quant.wieght.bits=4")
    assert code == 2 and len(err.splitlines()) == 1
    assert "quant.wieght" in err and "weight" in err


def test_bad_key_inside_a_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  id: embedded:tiny-sdxl\n  dtpye: fp16\n")
    with pytest.raises(MpqError, match="model.dtpye"):
        load_config(str(bad))


def test_bad_value_is_named():
    with pytest.raises(MpqError, match="model.dtype"):
        load_config("tiny-sdxl", ["model.dtype=int3"])


def test_missing_local_model_folder(capsys, tmp_path):
    code, err = run_cli(
        capsys, "ptq", "--config", "tiny-sdxl", "--outdir", str(tmp_path / "r"), f"model.id={tmp_path}/nope/sdxl"
    )
    assert code == 2 and len(err.splitlines()) == 1 and "no such folder" in err


def test_unreachable_hub_id_says_how_to_use_a_local_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "ptq", "--config", "sdxl-turbo", "--outdir", str(tmp_path / "r"), "model.device=cpu")
    assert code == 2 and len(err.splitlines()) == 1
    assert "stabilityai/sdxl-turbo" in err and "model.id=" in err and "local" in err


def test_plan_with_unknown_layer_or_uncalibrated_bits(capsys, tiny_run, tmp_path):
    plan = tmp_path / "w.yaml"
    plan.write_text("model.conv_in: 8\nmodel.not_a_layer: 4\n")
    code, err = run_cli(
        capsys, "infer", "--base_path", str(tiny_run.root), "--config_weight_mp", str(plan), "--num_imgs", "1"
    )
    assert code == 2 and len(err.splitlines()) == 1 and "model.not_a_layer" in err
    plan.write_text("model.conv_in: 3\n")
    code, err = run_cli(
        capsys, "infer", "--base_path", str(tiny_run.root), "--config_weight_mp", str(plan), "--num_imgs", "1"
    )
    assert code == 2 and len(err.splitlines()) == 1 and "3 bits" in err and "[2, 4, 8]" in err


def test_run_dir_without_checkpoint(capsys, tmp_path):
    code, err = run_cli(capsys, "infer", "--base_path", str(tmp_path), "--config", "tiny-sdxl", "--weight-bits", "8")
    assert code == 2 and len(err.splitlines()) == 1 and "ckpt.safetensors" in err


def test_a_run_directory_is_used_by_one_job_at_a_time(tiny_run, tmp_path, capsys):
    """A second job on a busy run directory gets a one-line error naming the holder; a killed holder's lock
    is gone with its process and does not block the next job."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import repo_root

    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom mpq.runner.rundir import RunDir\n"
            f"with RunDir({str(run)!r}).lock('mpq sensitivity'):\n    print('held', flush=True)\n    time.sleep(600)\n",
        ],
        cwd=repo_root(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    code, err = run_cli(capsys, "sensitivity", "--base_path", str(run), "--kind", "weight", "--metric", "sqnr")
    assert code == 2 and len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "mpq sensitivity" in err
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    from mpq.runner.rundir import RunDir

    with RunDir(run).lock("mpq report"):  # the stale lock file is still there, but nobody holds it
        pass
    assert (run / ".lock").is_file()


def test_the_lock_names_the_command_that_holds_it(tiny_run, tmp_path, capsys, monkeypatch):
    """A second job is told which command holds the run: `mpq run` while it is in any stage, not the stage it
    ends at (`mpq report`)."""
    import shutil

    from mpq.runner.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    held: list[str] = []

    def lock(self, what, write=True):  # records the holder's name and stops before any stage
        held.append(what)
        raise MpqError(f"held by {what}")

    monkeypatch.setattr(RunDir, "lock", lock)
    for argv, name in [(["run"], "mpq run"), (["select"], "mpq select"), (["report"], "mpq report")]:
        code, err = run_cli(capsys, *argv, "--base_path", str(run))
        assert code == 2 and err.strip().endswith(f"held by {name}"), (argv, err)
    assert held == ["mpq run", "mpq select", "mpq report"]


def test_a_layer_subset_is_skipped_with_a_note_and_the_search_names_the_key(tiny_run, tmp_path, capsys):
    """sensitivity.layers selecting no content layer: `mpq sensitivity` skips the SSIM metric with a note; a command
    that needs the search names sensitivity.layers as the cause before any stage runs (not 'delete the file and
    re-run', which cannot help)."""
    import shutil

    from mpq.runner.rundir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.root, run.root)
    subset = ['sensitivity.layers=["conv_in"]', "sensitivity.num_images=4"]
    assert main(["sensitivity", "--base_path", str(run.root), *subset]) == 0
    assert "weight ssim: skipped, sensitivity.layers=['conv_in'] selects no content layer" in capsys.readouterr().out
    for command in ("search", "run"):
        code = main([command, "--base_path", str(run.root), *subset])
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "[" not in captured.out  # refused before any stage runs
        assert "sensitivity.layers=['conv_in']" in err and "every layer" in err


def test_retired_config_key_is_named_with_its_reason(capsys):
    code, err = run_cli(capsys, "layers", "--config", "tiny-sdxl", "--meta", "quant.weight.symmetric=true")
    assert code == 2 and len(err.splitlines()) == 1 and "quant.weight.symmetric" in err
