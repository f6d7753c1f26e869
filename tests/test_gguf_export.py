"""`mpq export --format gguf`: one .gguf denoiser in the original checkpoint layout. The layout is proved by
diffusers' own single-file converters (full-size architectures, every family with a single-file path); the search
gives the layers of one fused tensor one type; a run for GGUF exports a file whose tensors hold exactly the planned
types and the simulated codes, and that diffusers loads without mpq and draws what mpq simulated."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.export.gguf_layout import Original, check_roundtrip, fused_layers, layout, swapped
from mpq.models.loader import load_arch, meta_denoiser
from mpq.plan import BitPlan, final_plan, write_plan
from mpq.runner.choices import TARGETS
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir
from mpq.search.program import Problem, solve_mpq

from conftest import runtime_draws_the_simulation


def labelled(den: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter as a tensor whose rows carry its own numbers (parameter k, row r: 30000 k + r, exact in
    float64), expanded over the other dimensions: any misplaced, reordered or unswapped row shows, and no memory
    is spent."""
    out = {}
    for k, (name, t) in enumerate(den.state_dict().items()):
        rows = torch.arange(t.shape[0], dtype=torch.float64) + 30000.0 * k
        out[name] = rows.reshape(-1, *([1] * (t.dim() - 1))).expand(t.shape)
    return out


FULL = [  # (config, architecture overrides: fewer blocks at full width), names of the published checkpoints
    ("sdxl-base-random", {}, ["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                              "model.diffusion_model.output_blocks.2.2.conv.weight",
                              "model.diffusion_model.label_emb.0.0.weight"]),
    ("sd35-medium-random", {"num_layers": 3, "dual_attention_layers": [0]},
     ["joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.2.context_block.adaLN_modulation.1.weight",
      "final_layer.adaLN_modulation.1.weight"]),
    ("flux-schnell-random", {"num_layers": 1, "num_single_layers": 1},
     ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.bias"]),
]  # fmt: skip


@pytest.mark.parametrize("config, overrides, names", FULL, ids=[c for c, _, _ in FULL])
def test_diffusers_converter_gives_back_every_parameter_of_a_full_size_layout(config, overrides, names):
    arch = load_arch(load_config(config))
    arch["denoiser"].update(overrides)
    den = meta_denoiser(arch)
    family = {"sdxl-base-random": "unet", "sd35-medium-random": "sd3", "flux-schnell-random": "flux"}[config]
    params = labelled(den)
    originals = layout(family, list(params), den.config)
    assert set(names) <= {o.name for o in originals}
    check_roundtrip(family, originals, params, den.config)
    # the check can fail: one fused tensor in the wrong order, or two tensors' names exchanged
    broken = list(originals)
    if family == "unet":  # two tensors' names exchanged
        i, j = [k for k, o in enumerate(originals) if "attn1.to_" in o.name][:2]
        broken[i] = Original(originals[j].name, originals[i].parts)
        broken[j] = Original(originals[i].name, originals[j].parts)
    else:  # one fused tensor's parts in the wrong order
        i = next(k for k, o in enumerate(originals) if len(o.parts) > 1)
        broken[i] = Original(originals[i].name, originals[i].parts[::-1], originals[i].swap)
    with pytest.raises(MpqError, match="does not give this"):
        check_roundtrip(family, broken, params, den.config)


def test_a_family_without_a_single_file_layout_is_one_line(tmp_path, capsys):
    """PixArt: a `target: gguf` run is refused before its first stage: no GGUF runtime reads the file it would
    plan for."""
    from test_families import TINY_RUN

    code = main(["run", "--config", "tiny-pixart-random", "--outdir", str(tmp_path / "r"), *TINY_RUN, "target=gguf",
                 "sensitivity.layers=[]", "calib.num_samples=2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "no original single-file layout" in err and "Traceback" not in err


def test_the_search_ties_what_a_file_fuses():
    """Flux: each double block's image and text qkv, each single block's q, k, v and MLP input (linear1); the UNet
    fuses nothing; without GGUF candidates nothing is tied."""
    from mpq.quant.structure import quantizable_modules
    from mpq.search.build import file_ties

    found = {}
    for config, expected in (("tiny-flux-random", 2 + 2), ("tiny-sdxl", 0)):
        cfg = load_config(config, ["target=gguf"])
        names = list(quantizable_modules(meta_denoiser(load_arch(cfg))))
        found[config] = file_ties(cfg, names)
        assert len(found[config]) == expected, config
        assert file_ties(load_config(config), names) == []
    single = next(t for t in found["tiny-flux-random"] if "single" in t[0])
    assert [n.rsplit(".", 1)[-1] for n in single] == ["to_q", "to_k", "to_v", "proj_mlp"]


def test_tied_layers_take_one_choice_and_the_program_equals_brute_force():
    rng = np.random.default_rng(5)
    names = [f"model.l{i}" for i in range(6)]
    bits = [list(TARGETS["gguf"][::2])] * 6  # q4_0, q5_0, q8_0
    sizes = rng.integers(100, 1000, 6).astype(float)
    nbytes = [[sizes[i] * {4: 4.5, 5: 5.5, 8: 8.5}[int(b[6])] / 8 for b in bits[i]] for i in range(6)]
    scores = [sorted(rng.uniform(0, 60, 3).tolist()) for _ in range(6)]
    ties = [("model.l0", "model.l1", "model.l2"), ("model.l4", "model.l5")]
    problem = Problem(names, ["quality"] * 6, sizes, bits, scores, nbytes, 0.0, "weight", ties)
    lo, hi = problem.bytes_range()
    for frac in (0.2, 0.5, 0.8):
        budget = lo + frac * (hi - lo)
        sol = solve_mpq(problem, budget, float("inf"))
        best = max(
            (
                problem.norm_objective(dict(zip(names, combo)), "quality")
                for combo in itertools.product(*bits)
                if combo[0] == combo[1] == combo[2] and combo[4] == combo[5]
                and problem.plan_bytes(dict(zip(names, combo))) <= budget
            ),
        )  # fmt: skip
        assert sol.plan["model.l0"] == sol.plan["model.l1"] == sol.plan["model.l2"]
        assert sol.plan["model.l4"] == sol.plan["model.l5"]
        assert problem.norm_objective(sol.plan, "quality") == pytest.approx(best, abs=1e-9)
    untied = Problem(names, ["quality"] * 6, sizes, bits, scores, nbytes, 0.0, "weight")
    split = solve_mpq(untied, lo + 0.5 * (hi - lo), float("inf")).plan  # without the ties the optimum splits them
    assert len({split[n] for n in ties[0]}) > 1 or len({split[n] for n in ties[1]}) > 1


def _types_in_file(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_a_run_for_gguf_exports_the_plan_in_one_file_diffusers_loads_without_mpq(tmp_path):
    """target=gguf on the embedded SD3 (fused qkv): every stage; one type per fused tensor; the file holds exactly
    the planned types and the simulated codes, at the priced bytes; diffusers' single-file loader draws the
    simulated images; a plan that splits a fused tensor is refused in one line."""
    import gguf
    from gguf import quants
    from test_families import TINY_RUN

    from mpq.calibration.checkpoint import quantized_pipeline
    from mpq.quant.formats import resolve

    run = RunDir(tmp_path / "run")
    two = "[gguf-q4_0,gguf-q8_0]"  # two of the target's five, and estimated sensitivity: the suite's time (exact
    # sensitivity of data-free runtime formats runs in tests/test_sdnq.py)
    fewer = [f"quant.weight_formats={two}", f"search.weight.bits_content={two}", f"search.weight.bits_quality={two}"]
    fewer.append("sensitivity.method=local")
    with contextlib.redirect_stdout(io.StringIO()):
        argv = ["run", "--config", "tiny-sd3", "--outdir", str(run.root), *TINY_RUN, "target=gguf", *fewer]
        assert main(argv) == 0
    cfg = load_config(str(run.root / "config.yaml"))
    plan = final_plan(run)
    assert set(plan.weight.values()) == {"gguf-q4_0", "gguf-q8_0"}  # a mixed plan
    den = meta_denoiser(load_arch(cfg))
    originals = layout("sd3", list(den.state_dict()), den.config)
    ties = fused_layers(originals)
    assert ties and all(len({plan.weight[f"model.{p}"] for p in tie}) == 1 for tie in ties)

    out = tmp_path / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the run's target picks the format
        assert main(["export", "--base_path", str(run.root), "--out", str(out)]) == 0
    found = re.search(r"weights ([\d,]+) bytes \(([\d,]+) priced", printed.getvalue())
    assert found and found.group(1) == found.group(2), printed.getvalue()
    (path,) = out.glob("*.gguf")
    tensors = _types_in_file(path)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "sd3"
    assert json.loads(reader.fields["mpq.plan.weight"].contents()) == {n: str(k) for n, k in plan.weight.items()}
    _, qm, _ = quantized_pipeline(cfg, run, dtype=torch.float32)
    qm.apply(BitPlan(plan.weight))
    simulated = {n[len("model.") :]: qm.layers[n].weight_at(plan.weight[n]).detach() for n in plan.weight}
    rules = dict(r.split("=") for r in (out / "tensor_type_rules.txt").read_text().strip().split(","))
    checked = 0
    for o in originals:
        layers = o.layers
        if not layers or f"model.{layers[0]}" not in plan.weight:
            continue
        fmt = resolve(plan.weight[f"model.{layers[0]}"])
        t = tensors[o.name]
        matching = [r for r in rules if re.fullmatch(r, f"model.diffusion_model.{o.name}")]  # as sd.cpp matches
        assert len(matching) == 1 and rules[matching[0]] == t.tensor_type.name.lower()
        if not fmt.stores(tuple(simulated[layers[0]].shape)):
            assert t.tensor_type.name == "F32"
            continue
        assert t.tensor_type.name.lower() == fmt.qtype
        decoded = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
        expected = torch.cat([simulated[p] for p in layers])
        expected = (swapped(expected) if o.swap else expected).reshape(decoded.shape)
        assert torch.equal(decoded, expected), o.name  # the simulated codes, bit for bit
        checked += len(layers)
    assert checked >= len(plan.weight) - 2  # all but the patch embedding (a convolution: FP) and what fits no block

    diff, effect, quantized = runtime_draws_the_simulation(cfg, run, out, plan, tmp_path, "gguf")
    print(f"GGUF file in diffusers (tiny SD3) vs mpq simulation: max abs {diff:.3g}; simulation vs FP {effect:.3g}")
    assert quantized == checked and diff < 0.1 * effect, (diff, effect)  # diffusers dequantizes in fp16

    tie = ties[0]
    split = dict(plan.weight) | {f"model.{tie[0]}": "gguf-q4_0", f"model.{tie[1]}": "gguf-q8_0"}
    bad = write_plan(tmp_path / "split.formats.yaml", split)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", "--base_path", str(run.root), "--out", str(tmp_path / "x"), "--weight-plan", str(bad)])
    assert code != 0 and "are one tensor" in err.getvalue() and "Traceback" not in err.getvalue()


def test_the_unet_file_draws_the_simulated_images_in_diffusers(tiny_run, tiny_cfg, tmp_path, capsys):
    """The embedded SDXL-like UNet, a random plan of every type diffusers reads; its layers never fused."""
    from mpq.calibration.checkpoint import run_layers

    rng = random.Random(0)
    plan = BitPlan({i.name: rng.choice(TARGETS["gguf"]) for i in run_layers(tiny_cfg, tiny_run) if rng.random() > 0.1})
    plan_file = write_plan(tmp_path / "plan.formats.yaml", plan.weight)
    out = tmp_path / "export"
    assert main(["export", "--base_path", str(tiny_run.root), "--out", str(out), "--format", "gguf",
                 "--weight-plan", str(plan_file)]) == 0, capsys.readouterr().err  # fmt: skip
    printed = capsys.readouterr().out
    assert "diffusers' single-file converter gives back every parameter" in printed
    layers = int(re.search(r"\): (\d+) layers in their planned types", printed).group(1))
    diff, effect, quantized = runtime_draws_the_simulation(tiny_cfg, tiny_run, out, plan, tmp_path, "gguf")
    print(f"GGUF file in diffusers (tiny UNet) vs mpq simulation: max abs {diff:.3g}; simulation vs FP {effect:.3g}")
    assert quantized == layers > 0.5 * len(plan.weight) and diff < 0.1 * effect, (diff, effect)


def test_a_plan_of_another_runtime_or_of_nothing_is_one_line(tiny_run, tmp_path, capsys):
    from mpq.export.gguf_format import gguf_plan

    plan_file = write_plan(tmp_path / "plan.formats.yaml", {"model.conv_in": 4})
    code = main(["export", "--base_path", str(tiny_run.root), "--out", str(tmp_path / "o"), "--format", "gguf",
                 "--weight-plan", str(plan_file)])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "which a GGUF file does not store" in err and "Traceback" not in err, err
    with pytest.raises(MpqError, match="quantizes no weight"):
        gguf_plan({})
