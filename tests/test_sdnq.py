"""SDNQ's dtypes as weight candidates and `mpq export --format sdnq`: mpq's fake quant of an SDNQ dtype is SDNQ's own
layer, its price the bytes SDNQ stores; a run with SDNQ candidates goes through every stage; the export loads in a
process that never imports mpq and draws what mpq simulated (the other families: tests/test_families.py)."""

from __future__ import annotations

import contextlib
import io
import random
import re

import pytest
import torch

from mpq.commands.main import main
from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.export.sdnq_format import quantize_denoiser, sdnq_plan, sdnq_tensor_bytes
from mpq.models import denoiser_of, load_pipeline
from mpq.plan import BitPlan, final_plan, write_plan
from mpq.quant.formats import resolve
from mpq.quant.formats.sdnq import DTYPES
from mpq.quant.model import QuantModel
from mpq.runner.choices import TARGETS
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir

from conftest import sdnq_draws_the_simulation

# a spread of SDNQ's kinds: signed and unsigned integers, float8 and low-bit floats; its default groups, rows, groups
MIXED = [
    "sdnq-uint2",
    "sdnq-int3-g16",
    "sdnq-uint4",
    "sdnq-int4-row",
    "sdnq-int4-g64-had",
    "sdnq-fp6",
    "sdnq-float8_e4m3fn",
    "sdnq-int8",
]


def mixed_plan(names, seed: int = 0) -> BitPlan:
    rng = random.Random(seed)
    return BitPlan({n: rng.choice(MIXED) for n in names if rng.random() > 0.15})


def test_the_offered_dtypes_are_sdnqs_own():
    from sdnq.common import accepted_weight_dtypes, dtype_dict

    for name, bits in DTYPES.items():
        assert name in accepted_weight_dtypes and dtype_dict[name]["num_bits"] == bits, name


def test_a_name_sdnq_does_not_have_is_one_line(capsys, tiny_run):
    for bad, needle in (
        ("sdnq-int9", "SDNQ has no weight dtype 'int9'"),
        ("sdnq-nf4", "SDNQ has no weight dtype 'nf4'"),
        ("sdnq-int4-g0", "a group holds at least 1 input channel"),
    ):
        with pytest.raises(MpqError, match=needle) as err:
            resolve(bad)
        assert "\n" not in str(err.value) and "sdnq-<int2..8" in str(err.value)
    with pytest.raises(SystemExit) as exit_:  # refused while the command line is read
        main(["infer", "--base_path", str(tiny_run.root), "--weight-bits", "sdnq-int9", "--num_imgs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "SDNQ has no weight dtype 'int9'" in err[-1] and "Traceback" not in err


def test_fake_quant_is_sdnqs_layer_and_the_price_what_sdnq_stores(tiny_cfg):
    """Every layer of a mixed plan: mpq's fake-quant weight equals the weight SDNQ's own quantized module computes
    with (bit for bit), the layer's output equals the SDNQ module's, and the cost model's bytes are the bytes of the
    tensors SDNQ keeps for it."""
    from sdnq.utils import get_sdnq_params

    pipe = load_pipeline(tiny_cfg, dtype=torch.float32)
    qm = QuantModel(denoiser_of(pipe))
    qm.prepare([2, 4, 8], True)
    plan = mixed_plan(qm.names)
    sdnq, kept_fp = quantize_denoiser(
        denoiser_of(load_pipeline(tiny_cfg, dtype=torch.float32)), sdnq_plan(plan.weight), torch.float32
    )
    assert kept_fp == []  # every layer of the embedded UNet fills SDNQ's words
    cost = CostModel.from_config(tiny_cfg)
    seen = set()
    for name, key in plan.weight.items():
        layer, module = qm.layers[name], sdnq.get_submodule(name.split(".", 1)[1])
        assert type(module).__name__.startswith("SDNQ"), name
        w, params = layer.weight_at(key), get_sdnq_params(module)
        assert torch.equal(w, module.sdnq_dequantizer(**params, skip_compile=True).reshape(w.shape)), (name, key)
        # the compiled dequantizer SDNQ's layer runs where torch.compile works: the same but for a few fp32 roundings
        compiled = module.sdnq_dequantizer(**params).reshape(w.shape)
        assert torch.allclose(w, compiled, rtol=0, atol=4 * 1.2e-7 * float(w.abs().max())), (name, key)
        x = torch.randn((2, *layer.weight.shape[1:2], 6, 6) if w.dim() == 4 else (2, 3, w.shape[1]))
        layer.set_bits(key, None)
        assert torch.allclose(layer(x), module(x), rtol=0, atol=1e-6), (name, key)
        layer.set_bits(None, None)
        stored = sdnq_tensor_bytes(module)
        assert cost.format(key).stored_bytes(tuple(layer.weight.shape), layer.in_split) == stored, (name, key)
        seen.add((key, w.dim()))
    assert {k for k, _ in seen} == set(MIXED) and {d for _, d in seen} == {2, 4}  # every kind, Linear and Conv2d


def test_a_run_for_sdnq_goes_through_every_stage_and_exports_sdnqs_pipeline(tmp_path):
    """`target=sdnq` makes SDNQ's dtypes the weight candidates (nothing calibrated for them) and SDNQ's pipeline the
    export; every stage runs; the chosen plan mixes dtypes, costs what SDNQ stores, and loads without mpq."""
    from test_families import TINY_RUN

    run = RunDir(tmp_path / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--config", "tiny-flux-random", "--outdir", str(run.root), *TINY_RUN, "target=sdnq"]) == 0
    free = ", ".join(TARGETS["sdnq"])
    assert f"[ptq] {free}: nothing to calibrate" in out.getvalue()
    for stage in ("calib", "ptq", "sensitivity", "search", "select", "final", "report"):
        assert (run.stamps / f"{stage}.json").is_file(), stage
    plan = final_plan(run)
    assert plan.weight and all(str(k).startswith("sdnq-") for k in plan.weight.values())
    assert len(set(plan.weight.values())) > 1  # a mixed plan
    export = tmp_path / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the run's target picks the format
        assert main(["export", "--base_path", str(run.root), "--out", str(export), "--fp-dtype", "fp32"]) == 0
    found = re.search(r"tensors ([\d,]+) bytes \(([\d,]+) priced", printed.getvalue())
    assert found and found.group(1) == found.group(2), printed.getvalue()  # SDNQ's bytes are the priced ones
    assert "not exported: SDNQ computes activations" in printed.getvalue()
    cfg = load_config(str(run.root / "config.yaml"))
    diff, effect = sdnq_draws_the_simulation(cfg, run, export, plan, tmp_path)
    print(f"SDNQ export (tiny Flux, fp32) vs mpq simulation: max abs {diff:.3g}; simulation vs FP {effect:.3g}")
    assert diff < 1e-5 and effect > 100 * diff, (diff, effect)


def test_an_sdnq_export_of_the_unet_draws_the_simulated_images(tiny_run, tiny_cfg, tmp_path, capsys):
    """The embedded SDXL-like UNet (convolutions included), a mixed plan of SDNQ dtypes the run's checkpoint never
    listed (nothing to calibrate), exported in fp32 and in the default fp16."""
    from mpq.calibration.checkpoint import run_layers

    plan = mixed_plan([i.name for i in run_layers(tiny_cfg, tiny_run)], seed=1)
    plan_file = write_plan(tmp_path / "plan.formats.yaml", plan.weight)
    for dtype, bound in (("fp32", 1e-5), ("fp16", 5e-3)):  # measured: 6.0e-7 and 6.5e-4 (max abs, images in [0, 1])
        out = tmp_path / dtype
        code = main(
            [
                "export",
                "--base_path",
                str(tiny_run.root),
                "--out",
                str(out),
                "--format",
                "sdnq",
                "--weight-plan",
                str(plan_file),
                "--fp-dtype",
                dtype,
            ]
        )
        assert code == 0, capsys.readouterr().err
        diff, effect = sdnq_draws_the_simulation(tiny_cfg, tiny_run, out, plan, tmp_path)
        print(f"SDNQ export ({dtype}) vs mpq simulation: max abs {diff:.3g}; simulation vs FP {effect:.3g}")
        assert diff < bound and effect > 5 * diff, (dtype, diff, effect)
