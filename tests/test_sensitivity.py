"""Sensitivity: right layers per group, ordering by bits, fast == naive, kill-and-resume, bad run dirs."""

import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from mpq.commands.main import main
from mpq.layers import meta_layers
from mpq.runner.rundir import RunDir
from mpq.sensitivity.stage import compute_sensitivity

from conftest import repo_root

SMALL = ["sensitivity.num_images=4", "sensitivity.batch_size=8"]


@pytest.fixture(scope="module")
def sens_run(full_run, tmp_path_factory):
    """A run with its sensitivity files (the shared whole run's, with these sizes: copied, not made again)."""
    run = RunDir(tmp_path_factory.mktemp("sens") / "run")
    shutil.copytree(full_run[0].root, run.root)
    assert main(["sensitivity", "--base_path", str(run.root), *SMALL]) == 0  # up to date: skipped
    return run


def test_files_have_right_layers_and_ordering(sens_run):
    infos = meta_layers(sens_run.load_config())
    all_names = [i.name for i in infos]
    content = [i.name for i in infos if i.group == "content"]
    for kind in ("weight", "act"):
        sqnr = yaml.safe_load((sens_run.root / "sensitivity" / f"{kind}_sqnr.yaml").read_text())
        ssim = yaml.safe_load((sens_run.root / "sensitivity" / f"{kind}_ssim.yaml").read_text())
        assert list(sqnr) == all_names  # MixDQ: the SQNR file covers every layer, in module order
        assert list(ssim) == content  # the SSIM file covers the content group
        for table in (sqnr, ssim):
            assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in table.values())
        ordered = sum(v[2] >= v[1] >= v[0] for v in sqnr.values())
        assert ordered >= 0.9 * len(sqnr)
        assert all(0.0 <= x <= 1.0 for v in ssim.values() for x in v)
        assert sum(v[2] >= v[1] >= v[0] for v in ssim.values()) >= 0.8 * len(ssim)
    # re-running the stage skips it
    out = subprocess.run(
        [sys.executable, "-m", "mpq", "sensitivity", "--base_path", str(sens_run.root), *SMALL],
        capture_output=True,
        text=True,
        cwd=repo_root(),
    )
    assert out.returncode == 0 and "up to date, skipped" in out.stdout


@pytest.mark.parametrize(
    "kind,metric,layers",
    [
        ("weight", "sqnr", []),  # every layer: the prefix cache replays from every position
        ("act", "ssim", ["*mid_block.*", "*up_blocks.0.attentions.1.*"]),  # SSIM: the content layers of two blocks
    ],
)
def test_fast_equals_naive(sens_run, kind, metric, layers):
    cfg = sens_run.load_config(None, SMALL + [f"sensitivity.layers={layers}"])
    naive = compute_sensitivity(cfg, sens_run, kind, metric, "naive", show=False, write=False)
    fast = compute_sensitivity(cfg, sens_run, kind, metric, "fast", show=False, write=False)
    tol = 1e-3 if metric == "sqnr" else 1e-5
    assert naive.keys() == fast.keys()
    for name in naive:
        for a, b in zip(naive[name], fast[name]):
            assert a == b or abs(a - b) <= tol, (name, naive[name], fast[name])


def test_cache_budget_chunking_changes_nothing_and_unshared_fast_is_bit_identical(sens_run):
    """Chunking the calibration set for the memory budget changes no digit; with one pass per bit
    (share_bits=never) the fast path is bit-identical to naive."""
    # 30 layers from the first block to the last (sensitivity.layers): the same code paths as all 123, a quarter of
    # the time
    layers = (
        'sensitivity.layers=["*down_blocks.0.resnets.0.*","*mid_block.*",'
        '"*up_blocks.1.resnets.2.*","*conv_out","*up_blocks.0.attentions.0.*.attn1.*"]'
    )
    small = ["sensitivity.num_images=4", "sensitivity.batch_size=4", layers]
    chunked = compute_sensitivity(
        sens_run.load_config(None, small + ["sensitivity.cache_budget_mb=0.001"]),
        sens_run,
        "act",
        "sqnr",
        "fast",
        show=False,
        write=False,
    )
    whole = compute_sensitivity(
        sens_run.load_config(None, small), sens_run, "act", "sqnr", "fast", show=False, write=False
    )
    assert chunked == whole
    unshared = compute_sensitivity(
        sens_run.load_config(None, small + ["sensitivity.share_bits=never"]),
        sens_run,
        "act",
        "sqnr",
        "fast",
        show=False,
        write=False,
    )
    naive = compute_sensitivity(
        sens_run.load_config(None, small), sens_run, "act", "sqnr", "naive", show=False, write=False
    )
    assert unshared == naive
    assert whole == naive  # auto: SQNR runs one pass per bit, so the default fast path is bit-identical
    shared = compute_sensitivity(
        sens_run.load_config(None, small + ["sensitivity.share_bits=always"]),
        sens_run,
        "act",
        "sqnr",
        "fast",
        show=False,
        write=False,
    )
    # sharing a pass across bits moves a score within the 1e-3 dB tolerance, or (near the float floor) moves
    # the error energy by less than fp32 rounding: < 1e-11 of the signal energy
    assert all(
        abs(a - b) <= 1e-3 or abs(10 ** (-a / 10) - 10 ** (-b / 10)) < 1e-11
        for n in naive
        for a, b in zip(naive[n], shared[n])
        if a != b
    )


def test_kill_and_resume_gives_identical_file(sens_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(sens_run.root, run.root)
    target = run.root / "sensitivity" / "weight_sqnr.yaml"
    reference = target.read_text()
    target.unlink()
    partial = run.root / "sensitivity" / ".weight_sqnr.partial.json"
    cmd = [
        sys.executable,
        "-m",
        "mpq",
        "sensitivity",
        "--base_path",
        str(run.root),
        "--sensitivity_type",
        "weight",
        "--metric",
        "sqnr",
        *SMALL,
        "sensitivity.batch_size=4",
        "sensitivity.save_every_s=0",
    ]
    # the child stops itself (SIGSTOP) right after it has saved >= 40 items; then it is killed: no race with a poll
    child = (
        "import os, signal, sys\nimport mpq.runner.sharded as s\nsave = s.write_json\n"
        "def stop_after(path, data):\n    save(path, data)\n"
        "    if sum(len(v['batches']) for v in data.get('items', {}).values()) >= 40: os.kill(os.getpid(), "
        "signal.SIGSTOP)\n"
        "s.write_json = stop_after\nfrom mpq.commands.main import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, *cmd[3:]], cwd=repo_root(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the run ended before saving 40 items"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (
        sum(len(v["batches"]) for v in yaml.safe_load(partial.read_text())["items"].values()) >= 40
        and not target.exists()
    )
    assert (
        main(
            [
                "sensitivity",
                "--base_path",
                str(run.root),
                "--sensitivity_type",
                "weight",
                "--metric",
                "sqnr",
                *SMALL,
                "sensitivity.batch_size=4",
            ]
        )
        == 0
    )
    assert not partial.exists()
    resumed = yaml.safe_load(target.read_text())
    expected = yaml.safe_load(reference)
    assert list(resumed) == list(expected)
    # and the resumed file is byte-identical to an uninterrupted run with the same settings
    again = RunDir(tmp_path / "again")
    shutil.copytree(sens_run.root, again.root)
    assert (
        main(
            [
                "sensitivity",
                "--base_path",
                str(again.root),
                "--sensitivity_type",
                "weight",
                "--metric",
                "sqnr",
                *SMALL,
                "sensitivity.batch_size=4",
            ]
        )
        == 0
    )
    assert (again.root / "sensitivity" / "weight_sqnr.yaml").read_text() == target.read_text()


def test_bad_run_directories_are_one_line_errors(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((tiny_run.root / "config.yaml").read_text())
    assert main(["sensitivity", "--base_path", str(empty), "--sensitivity_type", "weight", "--metric", "sqnr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ckpt.safetensors" in err
    # a checkpoint calibrated for another model
    other = RunDir(tmp_path / "other")
    shutil.copytree(tiny_run.root, other.root)
    import json

    from safetensors.torch import load_file, save_file

    from mpq.runner.files import read_tensor_metadata

    meta = read_tensor_metadata(other.ckpt)
    manifest = json.loads(meta["mpq_manifest"])
    manifest["fingerprint"] = "0123456789abcdef"
    manifest["model_id"] = "stabilityai/sdxl-turbo"
    save_file(load_file(str(other.ckpt)), str(other.ckpt), metadata={"mpq_manifest": json.dumps(manifest)})
    assert main(["sensitivity", "--base_path", str(other.root), "--sensitivity_type", "act", "--metric", "sqnr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err
    # a corrupt checkpoint
    other.ckpt.write_bytes(b"not a safetensors file")
    assert main(["sensitivity", "--base_path", str(other.root), "--sensitivity_type", "act", "--metric", "sqnr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("corrupt" in err or "not an mpq checkpoint" in err)
