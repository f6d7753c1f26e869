"""The integer program: exact (brute force), byte accounting, bands, MixDQ flags, compare, errors."""

import itertools
import math

import numpy as np
import pytest
import torch
import yaml

from mpq.commands.main import main
from mpq.cost import CostModel, act_bytes, weight_bytes
from mpq.errors import MpqError
from mpq.layers import CONTENT, QUALITY, edge_layers, meta_layers
from mpq.plan import read_plan
from mpq.runner.config import load_config
from mpq.search.build import Entry, budget_for_avg, build_problem, run_entries
from mpq.search.program import solve_compare, solve_mpq, solve_reference, split_target

BITS = [2, 4, 8]


def random_problem(rng, n, kind="weight", protect=()):
    """``n`` layers of random sizes and scores, priced as packed weights + one fp16 scale per output channel;
    ``protect``: indices of layers kept FP (fixed bytes, out of the program)."""
    numel = [int(rng.integers(50, 5000)) for _ in range(n)]
    scales = [int(rng.integers(1, 16)) for _ in range(n)]
    entries = [
        Entry(
            f"model.l{i}", CONTENT if i % 2 else QUALITY, numel[i], lambda b, i=i: weight_bytes(numel[i], scales[i], b)
        )
        for i in range(n)
    ]
    ssim = {e.name: sorted(rng.uniform(0.3, 1.0, 3).tolist()) for e in entries if e.group == CONTENT}
    sqnr = {e.name: sorted(rng.uniform(0.0, 60.0, 3).tolist()) for e in entries}
    prot = [entries[i].name for i in protect]
    return build_problem(kind, entries, ssim, sqnr, BITS, {CONTENT: BITS, QUALITY: BITS}, prot), entries


def all_plans(problem, idx):
    for combo in itertools.product(*[problem.bits[i] for i in idx]):
        yield dict(zip([problem.names[i] for i in idx], combo))


def brute_reference(problem, target, k, band):
    shares = split_target(problem, target, k)
    total = 0.0
    for g in (CONTENT, QUALITY):
        idx = problem.members(g)
        best = -math.inf
        for plan in all_plans(problem, idx):
            if abs(problem.avg_bits(plan, g) - shares[g]) <= band + 1e-9:
                best = max(best, problem.raw_objective(plan, g))
        if best == -math.inf:
            return None
        total += best
    return total


def brute_mpq(problem, budget, k, band):
    idx = [i for i in range(len(problem.names)) if problem.bits[i]]
    best = None
    for plan in all_plans(problem, idx):
        ratio_ok = abs(problem.avg_bits(plan, CONTENT) - k * problem.avg_bits(plan, QUALITY)) <= band + 1e-9
        if problem.plan_bytes(plan) <= budget + 1e-6 and ratio_ok:
            value = problem.norm_objective(plan, CONTENT) + problem.norm_objective(plan, QUALITY)
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_mpq_mode_equals_brute_force(seed):
    """Odd seeds keep two layers FP (act-protected): their bytes are fixed, and the K constraint and every reported
    average use the one definition (over the layers the plan quantizes), so the solution satisfies the K it was
    solved for."""
    rng = np.random.default_rng(seed)
    problem, _ = random_problem(rng, int(rng.integers(5, 11)), protect=(0, 3) if seed % 2 else ())
    lo, hi = problem.bytes_range()
    solved = 0
    for frac in (0.15, 0.5, 0.85):
        for band in (0.3, 1.0):
            budget = lo + frac * (hi - lo)
            k = float(rng.uniform(0.5, 1.5))
            sol = solve_mpq(problem, budget, k, band=band)
            expected = brute_mpq(problem, budget, k, band)
            if expected is None:
                assert sol.status == "INFEASIBLE" and not sol.plan
                continue
            solved += 1
            assert sol.optimal and sol.gap <= 1e-9
            assert sol.details["content_norm_objective"] + sol.details["quality_norm_objective"] == pytest.approx(
                expected, abs=1e-7
            )
            assert problem.plan_bytes(sol.plan) <= budget + 1e-6
            assert abs(sol.details["content_avg_bits"] - k * sol.details["quality_avg_bits"]) <= band + 1e-9
            if seed % 2:
                assert problem.fixed_bytes > 0 and problem.names[0] not in sol.plan and problem.names[3] not in sol.plan
    assert solved >= 2


@pytest.mark.parametrize("seed", range(6))
def test_reference_mode_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    problem, _ = random_problem(rng, int(rng.integers(4, 11)))
    solved = 0
    for target, k, band in ((4.0, 1.0, 0.5), (3.5, 0.8, 0.3), (5.0, 1.2, 0.4), (4.0, 1.0, 0.02)):
        expected = brute_reference(problem, target, k, band)
        sol = solve_reference(problem, target, k, band)
        if expected is None:
            assert sol.status == "INFEASIBLE" and not sol.plan
            continue
        solved += 1
        assert sol.optimal
        assert sol.objective == pytest.approx(expected, abs=1e-7)
    assert solved >= 2


def test_plan_bytes_equal_what_is_stored(tiny_run):
    """The program's weight bytes, counted from what is really stored: each layer's codes packed by the export's
    packer, plus the scales the checkpoint holds for it (2 bytes each), for a random 2/4/8-bit plan."""
    from mpq.calibration.checkpoint import quantized_pipeline, run_layers
    from mpq.export.pack import pack

    cfg = load_config("tiny-sdxl")
    infos = run_layers(cfg, tiny_run)
    _, qm, _ = quantized_pipeline(cfg, tiny_run)
    rng = np.random.default_rng(0)
    plan = {i.name: int(rng.choice(BITS)) for i in infos}
    flat = {i.name: [0.5, 0.7, 0.9] for i in infos}
    problem = build_problem(
        "weight",
        run_entries("weight", infos, CostModel(wq=qm.weight_quant)),
        flat,
        flat,
        BITS,
        {CONTENT: BITS, QUALITY: BITS},
    )
    stored = 0
    for name, b in plan.items():
        layer = qm.layers[name]
        codes = torch.zeros(layer.weight.numel(), dtype=torch.int8)
        params = layer.w_scale[0].numel() + (layer.w_offset[0].numel() if layer.wq.asymmetric else 0)
        stored += pack(codes, b).numel() + 2 * params  # a scale (and offset) per output channel and group
    assert sum(len(layer.in_split) == 3 for layer in qm.layers.values()) == 6
    assert problem.plan_bytes(plan) == stored
    # activations: packed input + per-tensor scale and zero point per part; a BOS token and protected layers stay FP
    protect = [infos[0].name]
    aproblem = build_problem(
        "act",
        run_entries("act", infos, CostModel(2, 4)),
        flat,
        flat,
        BITS,
        {CONTENT: [4, 8], QUALITY: [4, 8]},
        protect=protect,
    )
    aplan = {i.name: 8 for i in infos[1:]}
    assert aproblem.plan_bytes(aplan) == infos[0].act_numel * 4 + sum(
        (i.act_numel - i.bos_numel) + 4 * i.n_parts + 4 * i.bos_numel for i in infos[1:]
    )
    assert sum(i.bos_numel > 0 for i in infos) == 12
    assert weight_bytes(100, 3, 4) == 50 + 6 and act_bytes(10, 2) == 3 + 4 and weight_bytes(100, 3, None) == 200


def test_reference_mode_keeps_band_and_sweeps(tmp_path):
    cfg = load_config("tiny-sdxl")
    infos = meta_layers(cfg)
    files = write_mixdq_files(tmp_path, infos)
    out = tmp_path / "plans"
    code = main(
        [
            "search",
            "--mixed_precision_type",
            "weight",
            "--sensitivity_ssim",
            str(files["ssim"]),
            "--sensitivity_sqnr",
            str(files["sqnr"]),
            "--para_size_config",
            str(files["size"]),
            "--mixed_precision_config",
            str(out),
            "--target_bitwidth",
            "4",
        ]
    )
    assert code == 0
    plans = sorted(out.glob("weight_*_*.yaml"))
    assert len(plans) >= 5
    ratios = yaml.safe_load(files["size"].read_text())
    ssim = yaml.safe_load(files["ssim"].read_text())
    import csv

    rows = list(csv.DictReader(open(out / "pareto.csv")))
    assert len(rows) == 100  # 10 targets x 10 K
    for r in rows:
        if not r["plan_file"]:
            continue
        plan = read_plan(out / r["plan_file"])
        assert set(plan) == set(ratios)
        target, k = float(r["target_avg_bits"]), float(r["K"])
        for group, names in ((CONTENT, [n for n in plan if n in ssim]), (QUALITY, [n for n in plan if n not in ssim])):
            size = sum(ratios[n] for n in names)
            avg = sum(ratios[n] * plan[n] for n in names) / size
            s_c = sum(ratios[n] for n in plan if n in ssim)
            s_q = sum(ratios[n] for n in plan if n not in ssim)
            a_q = target * (s_c + s_q) / (k * s_c + s_q)
            share = k * a_q if group == CONTENT else a_q
            assert abs(avg - share) <= 0.02 + 1e-9
        assert all(plan[n] in (4, 8) for n in plan if n not in ssim)  # reference: quality weights {4, 8}


def write_mixdq_files(tmp_path, infos):
    rng = np.random.default_rng(7)
    conv_in = next(i for i in infos if i.name == "model.conv_in").weight_numel
    size = {i.name: i.weight_numel / conv_in for i in infos}
    sqnr = {i.name: [float(v) for v in np.sort(rng.uniform(5, 60, 3)).round(3)] for i in infos}
    ssim = {i.name: [float(v) for v in np.sort(rng.uniform(0.5, 1.0, 3)).round(5)] for i in infos if i.group == CONTENT}
    files = {}
    for key, data in (("size", size), ("sqnr", sqnr), ("ssim", ssim)):
        files[key] = tmp_path / f"weight_{key}.yaml"
        files[key].write_text(yaml.safe_dump(data, sort_keys=False))
    return files


def test_compare_finds_a_plan_at_least_as_good_within_the_same_bits(tmp_path, capsys):
    infos = meta_layers(load_config("tiny-sdxl"))
    files = write_mixdq_files(tmp_path, infos)
    ssim = yaml.safe_load(files["ssim"].read_text())
    given = {i.name: (8 if n % 3 == 0 else 4) if i.name not in ssim else (2, 4, 8)[n % 3] for n, i in enumerate(infos)}
    plan_path, best_path = tmp_path / "given.yaml", tmp_path / "best.yaml"
    plan_path.write_text(yaml.safe_dump(given))
    code = main(
        [
            "search",
            "--compare",
            str(plan_path),
            "--out",
            str(best_path),
            "--sensitivity_ssim",
            str(files["ssim"]),
            "--sensitivity_sqnr",
            str(files["sqnr"]),
            "--para_size_config",
            str(files["size"]),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "given plan" in out and "optimal plan" in out and "OPTIMAL" in out
    best = read_plan(best_path)
    sqnr = yaml.safe_load(files["sqnr"].read_text())
    ratios = yaml.safe_load(files["size"].read_text())
    for group_names, table in (([n for n in given if n in ssim], ssim), ([n for n in given if n not in ssim], sqnr)):
        obj = lambda p: sum(table[n][BITS.index(p[n])] for n in group_names)  # noqa: E731
        avg = lambda p: sum(ratios[n] * p[n] for n in group_names) / sum(ratios[n] for n in group_names)  # noqa: E731
        assert obj(best) >= obj(given) - 1e-9
        assert avg(best) <= avg(given) + 1e-9


def test_impossible_budget_is_one_line_error_with_range(tmp_path, capsys):
    infos = meta_layers(load_config("tiny-sdxl"))
    files = write_mixdq_files(tmp_path, infos)
    base = [
        "search",
        "--mixed_precision_type",
        "weight",
        "--sensitivity_ssim",
        str(files["ssim"]),
        "--sensitivity_sqnr",
        str(files["sqnr"]),
        "--para_size_config",
        str(files["size"]),
        "--mixed_precision_config",
        str(tmp_path / "o"),
    ]
    code = main(base + ["--target_bitwidth", "1.0", "--K", "1.0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "infeasible" in err and ".." in err
    code = main(base + ["--mode", "mpq", "--target_bitwidth", "1.0", "--K", "1.0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "feasible budgets" in err


def test_budget_below_minimum_raises():
    rng = np.random.default_rng(3)
    problem, _ = random_problem(rng, 6)
    lo, hi = problem.bytes_range()
    with pytest.raises(MpqError, match="feasible range"):
        solve_mpq(problem, lo - 1, 1.0)
    assert budget_for_avg(problem, 8.0) >= hi - 1e-6


def test_compare_rejects_incomplete_plan():
    rng = np.random.default_rng(4)
    problem, _ = random_problem(rng, 5)
    with pytest.raises(MpqError, match="missing"):
        solve_compare(problem, {problem.names[0]: 4})


def test_run_dir_search_writes_family_csv_and_dedupes(tiny_run, tmp_path):
    import math
    import shutil
    import subprocess

    from mpq.runner.rundir import RunDir
    from mpq.search.candidates import read_candidates

    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run.root, run.root)
    from mpq.calibration.checkpoint import run_layers

    infos = run_layers(run.load_config(), run)
    assert [(i.name, i.act_numel, i.in_split, i.bos_aware) for i in infos] == [
        (i.name, i.act_numel, i.in_split, i.bos_aware) for i in meta_layers(run.load_config())
    ]  # the checkpoint's description
    rng = np.random.default_rng(11)
    for kind in ("weight", "act"):
        sqnr = {i.name: [float(v) for v in np.sort(rng.uniform(5, 60, 3))] for i in infos}
        ssim = {i.name: [float(v) for v in np.sort(rng.uniform(0.5, 1.0, 3))] for i in infos if i.group == CONTENT}
        (run.root / "sensitivity").mkdir(exist_ok=True)
        (run.root / "sensitivity" / f"{kind}_sqnr.yaml").write_text(yaml.safe_dump(sqnr))
        (run.root / "sensitivity" / f"{kind}_ssim.yaml").write_text(yaml.safe_dump(ssim))
    out = subprocess.run(
        [
            "bash",
            "shell/integer_program.sh",
            str(run.root),
            "search.sweep=target",
            "search.sweep_steps=3",
            "search.act.k_num=4",
        ],
        capture_output=True,
        text=True,
        cwd=str(__import__("conftest").repo_root()),
    )
    assert out.returncode == 0, out.stderr
    rows = read_candidates(run.root / "candidates" / "pareto.csv")
    assert {r.kind for r in rows} == {"weight", "act"}
    band = run.load_config().search.band
    for r in rows:  # every row, act rows with their FP (act-protected) layers too, satisfies the K it was solved for
        if r.feasible:
            assert abs(r.content_avg_bits - r.K * r.quality_avg_bits) <= band + 1e-4, r
    solved = [r for r in rows if r.solved]
    assert len([r for r in solved if r.kind == "weight"]) == 3 * run.load_config().search.weight.k_num
    assert len([r for r in solved if r.kind == "act"]) == 3 * 4
    for kind in ("weight", "act"):  # and every uniform plan of the bits both groups allow (4 and 8)
        uniform = [read_plan(run.root / "candidates" / kind / r.plan_file) for r in rows if r.status == "UNIFORM"
                   and r.kind == kind]  # fmt: skip
        assert sorted(b for p in uniform for b in set(p.values())) == [4, 8] and all(len(p) > 1 for p in uniform)
    # and the edges rule on the weights: W4 with the layers outside numbered blocks and the first/last block at W8
    (rule,) = [read_plan(run.root / "candidates" / "weight" / r.plan_file) for r in rows if r.status == "RULE"]
    edges = edge_layers(list(rule))
    assert edges and {rule[n] for n in edges} == {8} and {rule[n] for n in rule if n not in edges} == {4}
    for kind in ("weight", "act"):
        files = {r.plan_file for r in rows if r.kind == kind and r.plan_file}
        on_disk = {p.name for p in (run.root / "candidates" / kind).glob("*.yaml")}
        assert files == on_disk  # one file per distinct plan
        plans = [tuple(sorted(read_plan(run.root / "candidates" / kind / f).items())) for f in on_disk]
        assert len(plans) == len(set(plans))
        assert any(r.pareto for r in rows if r.kind == kind)
        assert all(r.status in ("OPTIMAL", "UNIFORM", "RULE") for r in rows if r.kind == kind and r.plan_file)
    assert not (run.root / "report").exists()  # plots belong to the report stage
    protect = __import__("torch").load(run.root / "candidates" / "act_protect.pt")
    n_content = sum(i.group == CONTENT for i in infos)
    assert len(protect) == math.ceil(0.01 * n_content) + math.ceil(0.01 * (len(infos) - n_content))  # 1% of each group
    act_plan = read_plan(next((run.root / "candidates" / "act").glob("*.yaml")))
    assert not set(protect) & set(act_plan)
    # a single solve in the run lands beside the sweep folders, never over a sweep plan
    before = {p.name: p.read_text() for p in (run.root / "candidates" / "weight").glob("*.yaml")}
    assert (
        main(
            [
                "search",
                "--base_path",
                str(run.root),
                "--kind",
                "weight",
                "--K",
                "0.8",
                "--target_bitwidth",
                "3.9",
                "search.sweep_steps=3",
                "search.act.k_num=4",
            ]
        )
        == 0
    )
    assert {p.name: p.read_text() for p in (run.root / "candidates" / "weight").glob("*.yaml")} == before
    assert len(list((run.root / "candidates" / "manual").glob("weight_*_0.80.yaml"))) == 1
    again = subprocess.run(
        [
            "bash",
            "shell/integer_program.sh",
            str(run.root),
            "search.sweep=target",
            "search.sweep_steps=3",
            "search.act.k_num=4",
        ],
        capture_output=True,
        text=True,
        cwd=str(__import__("conftest").repo_root()),
    )
    assert "up to date, skipped" in again.stdout


def test_full_sweep_covers_the_byte_range_without_gaps():
    """search.sweep=full: budgets from the fewest to the most bits every sweep_density average bits (plus the target
    and the named budgets); at every budget some K finds a plan that fills it, so the family has no gap in bytes
    larger than the density (plus one layer's granularity)."""
    from mpq.search.sweep import avg_for_bytes, run_sweep, sweep_grid

    rng = np.random.default_rng(5)
    problem, entries = random_problem(rng, 40)
    per_bit = budget_for_avg(problem, 1.0) - budget_for_avg(problem, 0.0)
    named = budget_for_avg(problem, 5.3)
    s = load_config(
        "tiny-sdxl", ["search.sweep_density=0.5", "search.weight.k_num=3", f"search.weight.budgets=[6.1,{named:.0f}B]"]
    ).search
    targets, ks = sweep_grid(s, "weight", problem=problem)
    lo, hi = problem.avg_range()
    assert (targets[0], targets[-1]) == (round(lo, 4), round(hi, 4)) and ks[-1] == math.inf
    assert max(np.diff(targets)) <= 0.5 + 1e-9
    assert {4.0, 6.1, round(avg_for_bytes(problem, round(named)), 4)} <= set(targets)
    rows, plans = run_sweep(problem, "weight", "mpq", targets, ks, s, show=False)
    best = {}
    for r in rows:
        assert not r.feasible or r.bytes <= r.budget_bytes + 1e-6
        if r.feasible:
            best[r.target_avg_bits] = max(best.get(r.target_avg_bits, 0.0), r.bytes)
    assert set(best) == set(targets)  # every budget has a plan
    grain = max(e.price(8) - e.price(4) for e in entries)  # the largest one-layer step
    gaps = np.diff([best[t] for t in targets])
    assert gaps.max() <= 0.5 * per_bit + grain, (gaps.max(), 0.5 * per_bit, grain)


def test_named_budgets_in_bits_or_bytes():
    from mpq.search.sweep import avg_for_bytes, budget_avg_bits, parse_bytes

    assert parse_bytes("750KB") == 750e3 and parse_bytes("1.5 MiB") == 1.5 * 2**20 and parse_bytes("42b") == 42
    for bad in ("lots", "12 parsecs", "KB"):
        with pytest.raises(MpqError, match="average bits"):
            parse_bytes(bad)
    problem, _ = random_problem(np.random.default_rng(2), 6)
    assert budget_avg_bits(problem, 4.5) == 4.5
    nbytes = budget_for_avg(problem, 5.25)
    assert avg_for_bytes(problem, nbytes) == pytest.approx(5.25)
    assert budget_avg_bits(problem, f"{nbytes}B") == pytest.approx(5.25)
    with pytest.raises(MpqError, match="search.weight.budgets"):
        load_config("tiny-sdxl", ["search.weight.budgets=[4,lots]"])


def test_full_sweep_reaches_the_fewest_bits_below_the_groups_floor():
    """Quality layers limited to {4, 8}: the full sweep's budgets under that floor are solved with every bit allowed
    (the same layers and prices), so the family starts at every layer's fewest bits; above it, the groups' bits hold."""
    from mpq.search.sweep import run_sweep, sweep_grid

    rng = np.random.default_rng(8)
    _, entries = random_problem(rng, 12)
    ssim = {e.name: sorted(rng.uniform(0.3, 1.0, 3).tolist()) for e in entries if e.group == CONTENT}
    sqnr = {e.name: sorted(rng.uniform(0.0, 60.0, 3).tolist()) for e in entries}
    groups = build_problem("weight", entries, ssim, sqnr, BITS, {CONTENT: BITS, QUALITY: [4, 8]})
    every = build_problem("weight", entries, ssim, sqnr, BITS, {CONTENT: BITS, QUALITY: BITS})
    s = load_config("tiny-sdxl", ["search.sweep_density=0.5"]).search
    targets, ks = sweep_grid(s, "weight", problem=groups, below=every)
    floor = groups.avg_range()[0]
    assert targets[0] == 2.0 < floor and targets[-1] == 8.0
    rows, plans = run_sweep(groups, "weight", "mpq", targets, ks, s, show=False, below=every)
    quality = {e.name for e in entries if e.group == QUALITY}
    lowest = plans[next(r.plan_file for r in rows if r.target_avg_bits == 2.0 and r.feasible)]
    assert set(lowest.values()) == {2}  # uniform W2: only reachable with W2 on quality layers
    for r in rows:
        if r.feasible and r.target_avg_bits >= floor:
            assert all(plans[r.plan_file][n] in (4, 8) for n in quality)


def test_reference_plans_stay_within_the_bytes_selection_allows():
    """MixDQ's reference programs keep each group's average bits within +-band of its share, so a plan may pass the
    target by up to band bits; selection's limit in reference mode (the bytes at target + band) admits every such
    plan, and the bytes at the bare target would refuse some of them."""
    rng = np.random.default_rng(11)
    band, over = 0.05, 0
    for _ in range(30):
        problem, _ = random_problem(rng, 8)
        target, k = float(rng.uniform(3.0, 6.0)), float(rng.uniform(0.8, 1.25))
        sol = solve_reference(problem, target, k, band)
        if sol.status == "INFEASIBLE":
            continue
        nbytes = problem.plan_bytes(sol.plan)
        assert nbytes <= budget_for_avg(problem, target + band) * (1 + 1e-9)
        over += nbytes > budget_for_avg(problem, target)
    assert over > 0  # the slack is needed: some plans pass the bare target


def test_a_layer_that_changes_nothing_does_not_break_the_program():
    """An MMDiT's last block drops its text-stream outputs: quantizing its text queries leaves the output exactly
    unchanged, SQNR +inf at every bit. The program still solves (the group's normalization stays finite; the layer
    scores the same at every bit) and equals brute force."""
    rng = np.random.default_rng(11)
    _, entries = random_problem(rng, 7)
    quality = [e for e in entries if e.group == QUALITY]
    sqnr = {e.name: sorted(rng.uniform(0.0, 60.0, 3).tolist()) for e in entries}
    sqnr[quality[0].name] = [math.inf] * 3
    ssim = {e.name: sorted(rng.uniform(0.3, 1.0, 3).tolist()) for e in entries if e.group == CONTENT}
    problem = build_problem("weight", entries, ssim, sqnr, BITS, {CONTENT: BITS, QUALITY: BITS})
    i = problem.names.index(quality[0].name)
    assert all(math.isfinite(v) for v in problem.scores[i]) and len(set(problem.scores[i])) == 1
    lo, hi = problem.bytes_range()
    sol = solve_mpq(problem, lo + 0.6 * (hi - lo), math.inf)
    assert sol.optimal and quality[0].name in sol.plan
    expected = brute_mpq(problem, lo + 0.6 * (hi - lo), 1.0, 1e9)  # band 1e9: no K constraint
    got = problem.norm_objective(sol.plan, CONTENT) + problem.norm_objective(sol.plan, QUALITY)
    assert got == pytest.approx(expected, abs=1e-9)


def test_a_narrower_candidate_set_swept_too_joins_the_family(tiny_run, tmp_path):
    """``search.weight.also=[[4,8]]``: the plans of a sweep over W4/W8 alone join the program's family (a plan it has
    keeps its file, a new one is named after the set), each distinct plan once."""
    import shutil

    from mpq.runner.rundir import RunDir
    from mpq.search.candidates import read_candidates

    rng = np.random.default_rng(5)
    settings = {
        "union": ["search.weight.also=[[4,8]]"],
        "narrow": ["search.weight.bits_content=[4,8]", "search.weight.every_bit_below=false"],
    }
    runs = {}
    for label in settings:
        run = RunDir(tmp_path / label)
        shutil.copytree(tiny_run.root, run.root)
        runs[label] = run
    infos = meta_layers(runs["union"].load_config())
    files = {}
    for kind in ("weight", "act"):
        sqnr = {i.name: [float(v) for v in np.sort(rng.uniform(5, 60, 3))] for i in infos}
        ssim = {i.name: [float(v) for v in np.sort(rng.uniform(0.5, 1.0, 3))] for i in infos if i.group == CONTENT}
        files[kind] = (yaml.safe_dump(sqnr), yaml.safe_dump(ssim))
    for label, extra in settings.items():
        run = runs[label]
        (run.root / "sensitivity").mkdir(exist_ok=True)
        for kind, (sqnr, ssim) in files.items():
            (run.root / "sensitivity" / f"{kind}_sqnr.yaml").write_text(sqnr)
            (run.root / "sensitivity" / f"{kind}_ssim.yaml").write_text(ssim)
        sweep = ["search.sweep=target", "search.sweep_steps=3", "search.weight.target_bitwidth=6"]
        sweep += ["search.weight.k_num=2", "search.act.k_num=2"]
        argv = ["search", "--base_path", str(run.root), *sweep, *extra]
        assert main(argv) == 0

    def plans(run):
        folder = run.root / "candidates" / "weight"
        return {p.name: tuple(sorted(read_plan(p).items())) for p in folder.glob("*.yaml")}

    union, narrow = plans(runs["union"]), plans(runs["narrow"])
    assert set(narrow.values()) <= set(union.values())  # every plan of the narrower sweep is in the family
    assert len(set(union.values())) == len(union)  # each once
    added = [f for f in union if f.startswith("weight_w48_")]
    assert added and all({b for _, b in union[f]} <= {4, 8} for f in added)
    assert any(2 in {b for _, b in p} for p in union.values())  # and the program's own plans, W2 on content layers
    rows = read_candidates(runs["union"].candidate_table)
    assert {r.plan_file for r in rows if r.kind == "weight" and r.plan_file} == set(union)
