"""A user's files are never at risk: no file mpq reads runs code, and no command writes into a folder it does not own
(stage folders, run directories, earlier outputs holding foreign files). Each class is tried at every place it can
occur, and every refusal comes before the model loads."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.images import IMAGES
from mpq.plan import read_layer_list
from mpq.runner.outputs import check_output_folder
from mpq.runner.rundir import RunDir
from mpq.trace.files import TRACE

from conftest import repo_root


class _Payload:
    """Unpickling this creates ``marker``: the proof that loading a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path, wrap=lambda p: {"step": 0, "payload": p}) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(_Payload(marker)), path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("mpq: error:") and not any("Traceback" in line for line in err), err
    return err[-1]


# ----------------------------------------------------------------------------- no deserialization runs code
def test_every_pickle_capable_load_in_mpq_is_weights_only():
    """The class, searched: every torch.load in the package passes weights_only=True (and no pickle, marshal or
    yaml.load elsewhere)."""
    for path in (repo_root() / "mpq").rglob("*.py"):
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{i}: {line.strip()}"
            assert "weights_only=False" not in line, f"{path}:{i}"
            for unsafe in ("pickle.load", "marshal.load", "yaml.load(", "yaml.unsafe_load", "allow_pickle=True"):
                assert unsafe not in line, f"{path}:{i}: {line.strip()}"


@pytest.mark.parametrize("state", ["vae.pt", "pool.pt"])
def test_a_planted_training_state_never_runs(tmp_path, state):
    """The VAE phase's state is read first; the latent pool after one VAE step."""
    out, marker = tmp_path / "tiny", tmp_path / "RAN"
    _plant(out / ".train" / state, marker)
    cmd = [sys.executable, "scripts/train_tiny.py", "--outdir", str(out), "--vae-steps", "1", "--unet-steps", "1"]
    cmd += ["--judge-steps", "1", "--pool-size", "4", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root(), timeout=600)
    assert not marker.exists(), "loading a training state ran code"
    assert res.returncode == 2, res.stderr[-1500:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("mpq: error:") and state in last and "Traceback" not in res.stderr


def test_a_planted_act_protect_file_never_runs(tmp_path):
    marker = tmp_path / "RAN"
    path = tmp_path / "act_protect.pt"
    _plant(path, marker, wrap=lambda p: ["down_blocks.0.attn", p])
    with pytest.raises(MpqError, match="not a torch.save'd list"):
        read_layer_list(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- no command writes what it does not own
def test_output_folders_are_checked_by_one_rule(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.root / ".stamps").mkdir(parents=True)
    (run.root / "fp_images").mkdir()
    (run.root / "fp_images" / "0000.png").write_bytes(b"png")
    outside = tmp_path / "images"
    assert check_output_folder(outside, "--outdir", IMAGES) == outside.resolve()  # new
    for bad in (run.root / "fp_images", run.root / "mine", run.root, tmp_path):  # a stage's, inside, is, contains
        with pytest.raises(MpqError, match="run directory"):
            check_output_folder(bad, "--outdir", IMAGES)
    link = tmp_path / "link"
    link.symlink_to(run.root)
    with pytest.raises(MpqError, match="run directory"):  # through a symlinked parent
        check_output_folder(link / "new", "--outdir", IMAGES)
    own = run.root / "trace"
    assert check_output_folder(own, "--out", TRACE, run.root, own_folder=own) == own.resolve()
    outside.mkdir()
    (outside / "0000.png").write_bytes(b"png")
    assert check_output_folder(outside, "--outdir", IMAGES) == outside.resolve()  # an earlier image folder
    (outside / "NOTES.txt").write_text("mine")
    with pytest.raises(MpqError, match=r"did not write there \(NOTES.txt\)"):
        check_output_folder(outside, "--outdir", IMAGES)
    assert (outside / "NOTES.txt").read_text() == "mine"


def test_generate_never_writes_into_a_run(full_run, tmp_path, capsys):
    run = full_run[0]
    before = (run.fp_images / "0000.png").read_bytes()
    argv = ["generate", "--config", "tiny-sdxl", "--prompt", "a small red circle", "--outdir", str(run.fp_images)]
    assert main(argv) == 2
    assert "run directory" in one_line_error(capsys)
    assert (run.fp_images / "0000.png").read_bytes() == before


def test_export_over_an_earlier_export_keeps_a_users_file(tiny_run, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.root, run.root)
    base = ["export", "--base_path", str(run.root), "--format", "torchao", "--weight-bits", "8", "--act-bits", "8"]
    out = tmp_path / "exp"
    assert main([*base, "--out", str(out)]) == 0
    (out / "NOTES.txt").write_text("my notes")
    assert main([*base, "--out", str(out)]) == 2
    assert "NOTES.txt" in one_line_error(capsys) and (out / "NOTES.txt").read_text() == "my notes"
    for inside in (run.root / "myexport", tmp_path / "link" / "myexport"):  # a new folder inside the run, via a link
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(run.root)
        assert main([*base, "--out", str(inside)]) == 2
        assert "run directory" in one_line_error(capsys)
        assert not (run.root / "myexport").exists()


def test_trace_refuses_a_bad_folder_before_it_runs(full_run, tmp_path, capsys):
    run = full_run[0]
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "NOTES.txt").write_text("mine")
    base = ["trace", "--base_path", str(run.root), "--weight-bits", "8", "--act-bits", "8", "--no-layers"]
    for extra, what in (
        (["--out", str(run.fp_images)], "run directory"),
        (["--out", str(tmp_path / "t"), "--dump", str(dump)], "NOTES.txt"),
    ):
        mtime = os.stat(run.fp_images).st_mtime_ns
        assert main([*base, *extra]) == 2
        assert what in one_line_error(capsys)
        assert os.stat(run.fp_images).st_mtime_ns == mtime
    assert not (tmp_path / "t").exists()  # refused before the trace ran (nothing written)
