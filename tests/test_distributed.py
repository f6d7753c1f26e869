"""Scale-out over torch.distributed (gloo on CPU): two ranks give the files of one process bit for bit, a killed
job resumes from what every rank finished, and a rank that dies stops the job with a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpq.plan import read_layer_list
from mpq.runner.distributed import assign
from mpq.runner.rundir import RunDir

from conftest import repo_root

# a few layers across the network (2 content layers for SSIM): the same code paths as the whole model
LAYERS = (
    'sensitivity.layers=["*conv_out","*mid_block.resnets.1.*","*down_blocks.1.attentions.0.*.attn2.to_*",'
    '"*up_blocks.0.resnets.0.conv1"]'
)
SENS = ["sensitivity.num_images=4", "sensitivity.batch_size=4", LAYERS]
FILES = [f"{k}_{m}.yaml" for k in ("weight", "act") for m in ("sqnr", "ssim")]


def mpq(*args: str, nproc: int | None = None, background: bool = False, **kw):
    """``python -m mpq ...`` with one torch thread a process (ranks and the single-process reference alike:
    CPU kernels round differently with another thread count)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mpq", *args] + (["--nproc", str(nproc)] if nproc else [])
    if background:
        return subprocess.Popen(
            cmd,
            cwd=repo_root(),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd, cwd=repo_root(), env=env, capture_output=True, text=True, timeout=300, **kw)


def copy_run(src: RunDir, dst: Path) -> RunDir:
    shutil.copytree(src.root, dst)
    return RunDir(dst)


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory) -> RunDir:
    """The sensitivity files of one process (one thread)."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("dist") / "one")
    res = mpq("sensitivity", "--base_path", str(run.root), *SENS)
    assert res.returncode == 0, res.stderr[-2000:]
    return run


def test_assignment_balances_cost_not_count():
    costs = {"early": 10.0, "a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "late": 0.5}
    owner = assign(costs, 2)
    load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert owner["early"] != owner["a"] and max(load) == 10.0  # the expensive item alone; the others together
    assert assign(costs, 2) == owner  # deterministic


def test_two_ranks_write_the_files_of_one_process(reference, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "two")
    res = mpq("sensitivity", "--base_path", str(run.root), *SENS, nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    for f in FILES:
        assert (run.root / "sensitivity" / f).read_bytes() == (reference.root / "sensitivity" / f).read_bytes(), f
    assert "over 2 ranks" in res.stdout and "idle" in res.stdout
    assert not list((run.root / "sensitivity").glob(".*partial*"))


# each rank stops itself (SIGSTOP) once it has saved part of its act SQNR share: the job is then killed mid-stage,
# with no race against a poll; launched with torchrun itself, as users do
STOPPING_RANK = """import os, signal, sys
import mpq.runner.sharded as s
save = s.write_json
def stop_after(path, data):
    save(path, data)
    if ".act_sqnr.partial.rank" in str(path):
        os.kill(os.getpid(), signal.SIGSTOP)
s.write_json = stop_after
from mpq.commands.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_job_resumes_from_every_rank(reference, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "killed")
    sens = run.root / "sensitivity"
    child = tmp_path / "stopping_rank.py"
    child.write_text(STOPPING_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(child),
            "sensitivity",
            "--base_path",
            str(run.root),
            *SENS,
            "sensitivity.save_every_s=0",
        ],
        cwd=repo_root(),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and sum(_stopped(p) for p in _descendants(proc.pid)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before both ranks saved part of their work"
    ranks = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the agent and both ranks (in sessions of their own)
    for p in ranks:
        os.kill(p, signal.SIGKILL)
    proc.wait()
    assert len(list(sens.glob(".act_sqnr.partial.rank*.json"))) == 2 and not (sens / "act_sqnr.yaml").exists()
    res = mpq("sensitivity", "--base_path", str(run.root), *SENS, nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "act sqnr: resuming" in res.stdout  # what the ranks had finished is not computed again:
    assert (
        "weight sqnr: already made" in res.stdout and "weight ssim: already made" in res.stdout
    )  # whole files, and items
    for f in FILES:
        assert (sens / f).read_bytes() == (reference.root / "sensitivity" / f).read_bytes(), f


def test_dead_rank_stops_the_job_with_one_line(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "dead")
    proc = mpq("sensitivity", "--base_path", str(run.root), *SENS, nproc=2, background=True)
    victim, seen = None, time.monotonic()
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for pid in _descendants(proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"RANK=1" in env and time.monotonic() - seen > 4:  # rank 1, a few seconds in: loading or working
                victim = pid
        time.sleep(0.05)
    assert victim is not None, "rank 1 never started"
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("mpq: error: rank 1 of 2 failed (killed by SIGKILL") and "re-run" in last


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def test_run_with_two_ranks_shards_selection(full_run, tmp_path):
    """``mpq run --nproc 2`` re-makes selection sharded (the other stages on rank 0): the scores and the chosen
    plans of one process, bit for bit."""
    one, two = copy_run(full_run[0], tmp_path / "one"), copy_run(full_run[0], tmp_path / "two")
    for run in (one, two):
        shutil.rmtree(run.root / "selection")
    res = mpq("select", "--base_path", str(one.root))
    assert res.returncode == 0, res.stderr[-2000:]
    res = mpq("run", "--base_path", str(two.root), nproc=2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[select] weight:" in res.stdout and "over 2 ranks" in res.stdout and "[report] done" in res.stdout
    for f in ("weight_scores.csv", "act_scores.csv", "final_weight.yaml", "final_act.yaml"):
        assert (one.root / "selection" / f).read_bytes() == (two.root / "selection" / f).read_bytes(), f
    protect = [
        read_layer_list(r.root / "selection" / "final_act_protect.pt") for r in (one, two)
    ]  # a zip: its member names vary
    assert protect[0] == protect[1]
    # the refinement's rounds were shared out over the ranks: the same moves, the same values
    logs = [json.loads((r.root / "selection" / "weight_refine.json").read_text()) for r in (one, two)]
    assert logs[0]["plan_file"] and logs[0]["trail"] == logs[1]["trail"]
    assert (two.root / "report" / "summary.json").is_file()


def test_two_ranks_write_the_estimated_files_of_one_process(tiny_run, tmp_path):
    """sensitivity.method=hybrid (the fisher estimate, sharded by layer; exact SQNR for the uncertain layers, exact
    SSIM): two ranks write the files of one process, the estimate's and the exact subset's included."""
    est = [*SENS, "sensitivity.method=hybrid"]
    runs = [copy_run(tiny_run, tmp_path / name) for name in ("one", "two")]
    for run, nproc in zip(runs, (None, 2)):
        shutil.rmtree(run.root / "sensitivity", ignore_errors=True)
        res = mpq("sensitivity", "--base_path", str(run.root), *est, nproc=nproc)
        assert res.returncode == 0, res.stderr[-2000:]
    for f in [*FILES, "estimate/weight.fisher.yaml", "estimate/act_sqnr.exact.yaml", "hybrid_weight_sqnr.json"]:
        a, b = (r.root / "sensitivity" / f for r in runs)
        if f.endswith(".json"):  # its seconds differ
            assert {k: v for k, v in __import__("json").loads(a.read_text()).items() if k != "seconds"} == {
                k: v for k, v in __import__("json").loads(b.read_text()).items() if k != "seconds"
            }
        else:
            assert a.read_bytes() == b.read_bytes(), f
    assert not list((runs[1].root / "sensitivity").rglob(".*partial*"))
