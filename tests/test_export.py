"""Real low-bit export: packing, the mpq folder (loads, stays packed, draws the same images), torchao, encodings."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.commands.main import main
from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.export.folder import export_folder
from mpq.export.mpq_format import (
    denoiser_export,
    export_mpq,
    load_quantized,
    tensor_bytes,
    weight_bytes_of,
)
from mpq.export.pack import pack, packed_numel, unpack
from mpq.export.packed import PackedLayer
from mpq.images import generate
from mpq.layers import describe
from mpq.plan import BitPlan
from mpq.quant.model import PREFIX
from mpq.runner.rundir import RunDir

PROMPTS = [
    "a small red circle at the top left on a white background",
    "a large blue triangle in the center on a black background",
]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_and_density(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (33, 7), generator=torch.Generator().manual_seed(bits))
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert (
        packed.numel() == packed_numel(q.numel(), bits) == -(-q.numel() * bits // 8)
    )  # a dense bit stream at every width
    assert torch.equal(unpack(packed, bits, q.numel()).reshape(q.shape).long(), q)
    with pytest.raises(ValueError):
        pack(torch.tensor([hi + 1]), bits)


def mixed_plan(qm) -> BitPlan:
    """Every weight bit and act bit in use, FP layers on both sides, two act-protected layers."""
    rng = random.Random(0)
    names = qm.names
    weight = {n: rng.choice([2, 4, 8]) for n in names if rng.random() > 0.1}
    act = {n: rng.choice([4, 8, 8]) for n in names if rng.random() > 0.1}
    return BitPlan(weight, act).protect(names[3:5])


@pytest.fixture(scope="module")
def exported(tiny_run, tiny_cfg, tmp_path_factory):
    """(fake-quant images, plan, export info, qm) for the mixed plan, exported in fp32."""
    pipe, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    plan = mixed_plan(qm)
    qm.apply(plan)
    ref = generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np")
    out = tmp_path_factory.mktemp("export") / "w-mixed"
    with export_folder(out, "mpq", tiny_run.root) as folder:
        info = {**export_mpq(pipe, qm, plan, folder, tiny_cfg, torch.float32), "out": out}
    return ref, plan, info, qm


def test_export_loads_packed_and_draws_the_fake_quant_images(exported, tiny_cfg):
    ref, plan, info, qm = exported
    assert info["bos_cached"] > 0  # cross-attention k/v: BOS rows cached, not their FP weights
    pipe = load_quantized(info["out"])
    unet = pipe.unet
    packed = {n: m for n, m in unet.named_modules() if isinstance(m, PackedLayer)}
    assert len(packed) == len(set(plan.weight) | set(plan.act))
    for name, m in packed.items():
        w = plan.weight.get(PREFIX + name)
        assert ("qweight" in dict(m.named_buffers())) == (w is not None)
        assert "weight" not in m._parameters or w is None  # no FP copy of a quantized weight is resident
        if w is not None:
            assert m.qweight.dtype == torch.uint8 and m.qweight.numel() == packed_numel(
                m.spec.shape[0] * int(np.prod(m.spec.shape[1:])), w
            )
    out = generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np")
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(a, b)  # bit-identical in fp32
    fp_bytes = sum(layer.weight.numel() * 4 for layer in qm.layers.values())
    assert tensor_bytes(unet) < tensor_bytes(qm.denoiser) - 0.5 * fp_bytes  # resident memory really shrinks


def test_exported_weight_bytes_are_the_cost_model_bytes(tiny_run, tiny_cfg):
    """The packed file's quantizable-layer weights equal the cost model's bytes, priced with the export's widths
    (fp32 scales, FP weights at the export dtype): packing is as dense as the arithmetic claims."""
    _, qm, manifest = quantized_pipeline(tiny_cfg, tiny_run)
    infos = describe(qm, [])
    plan = mixed_plan(qm)
    for fp_dtype, fp_bytes in ((torch.float16, 2), (torch.float32, 4)):
        tensors = denoiser_export(qm, plan, fp_dtype)[0]
        paths = [n[len(PREFIX) :] for n in qm.names]
        expected = CostModel(4, fp_bytes, qm.weight_quant).plan_cost(plan, infos).weight_bytes
        assert weight_bytes_of(tensors, paths) == expected
    w4 = denoiser_export(qm, BitPlan.uniform(qm.names, 4, None), torch.float16)[0]
    w8 = denoiser_export(qm, BitPlan.uniform(qm.names, 8, None), torch.float16)[0]
    packed4 = sum(t.numel() for k, t in w4.items() if k.endswith(".qweight"))
    packed8 = sum(t.numel() for k, t in w8.items() if k.endswith(".qweight"))
    assert packed8 == sum(q.weight.numel() for q in qm.layers.values()) and abs(packed4 - packed8 / 2) <= len(qm.layers)


def test_fp16_export_and_cli_formats(tiny_run, tiny_cfg, tmp_path, capsys):
    assert (
        main(
            [
                "export",
                "--base_path",
                str(tiny_run.root),
                "--out",
                str(tmp_path / "w4a8"),
                "--weight-bits",
                "4",
                "--act-bits",
                "8",
            ]
        )
        == 0
    )
    assert "denoiser weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "w4a8" / "unet" / "config.json").read_text())
    assert (
        config["quantization_config"]["quant_method"] == "mpq"
        and config["quantization_config"]["fp_dtype"] == "float16"
    )
    pipe = load_quantized(tmp_path / "w4a8")
    fq_pipe, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    qm.apply(BitPlan.uniform(qm.names, 4, 8))
    a = np.stack(generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np"))
    b = np.stack(generate(fq_pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np"))
    assert 0 < float(((a - b) ** 2).mean()) < 1e-4  # FP16 storage of the FP parts: close, not identical

    # AIMET's encodings hold MixDQ's weight quantizer (symmetric, per channel): the default's is a one-line refusal
    enc_args = ["--out", str(tmp_path / "enc"), "--format", "encodings", "--weight-bits", "4", "--act-bits", "8"]
    assert main(["export", "--base_path", str(tiny_run.root), *enc_args]) == 2
    assert "quant.weight.levels=symmetric" in capsys.readouterr().err
    mixdq = tmp_path / "mixdq"
    shutil.copytree(tiny_run.root, mixdq)
    overrides = ["quant.weight.levels=symmetric", "quant.weight.granularity=channel"]
    assert main(["ptq", "--base_path", str(mixdq), "--force", *overrides]) == 0
    assert main(["export", "--base_path", str(mixdq), *enc_args]) == 0
    enc = json.loads((tmp_path / "enc" / "unet.encodings").read_text())
    _, qm, _ = quantized_pipeline(RunDir(mixdq).load_config(), RunDir(mixdq))
    name, layer = next(iter(qm.layers.items()))
    weights = enc["param_encodings"][f"{name[len(PREFIX) :]}.weight"]
    assert len(weights) == layer.weight.shape[0] * layer.n_parts
    e = weights[0]
    assert e["bitwidth"] == 4 and e["offset"] == -8 and e["is_symmetric"] == "True"
    assert e["min"] == pytest.approx(-8 * e["scale"]) and e["max"] == pytest.approx(7 * e["scale"])
    act = enc["activation_encodings"][f"{name[len(PREFIX) :]}.input"][0]
    assert (
        act["bitwidth"] == 8
        and act["min"] <= 0 <= act["max"]
        and act["max"] - act["min"] == pytest.approx(255 * act["scale"])
    )

    assert (
        main(
            [
                "export",
                "--base_path",
                str(tiny_run.root),
                "--out",
                str(tmp_path / "nope"),
                "--format",
                "mpq",
                "--weight-plan",
                str(tmp_path / "missing.yaml"),
            ]
        )
        == 2
    )
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(MpqError, match="not an exported pipeline folder"):
        load_quantized(tmp_path / "enc")


def test_torchao_path(tiny_run, tiny_cfg, tmp_path):
    pytest.importorskip("torchao")
    from mpq.export.torchao_format import load_torchao

    assert (
        main(
            [
                "export",
                "--base_path",
                str(tiny_run.root),
                "--out",
                str(tmp_path / "tao"),
                "--format",
                "torchao",
                "--weight-bits",
                "8",
                "--act-bits",
                "8",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "tao" / "torchao_summary.json").read_text())
    assert summary["linear"]["changed"] > 0 and summary["conv"]["changed"] > 0  # conv W8A8 -> weight-only: listed
    pipe, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    fp = np.stack(generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np"))
    load_torchao(tmp_path / "tao", pipe)
    kinds = {type(m.weight).__name__ for m in pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert (
        "Parameter" not in kinds and len(kinds) >= 2
    )  # every layer taken: int8 dynamic (linear) and int8 weight-only (conv)
    q = np.stack(generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np"))
    assert 0 < float(((q - fp) ** 2).mean()) < 1e-3


@pytest.mark.parametrize(
    "wq",
    [
        {"levels": "asymmetric", "granularity": "group", "group_size": 32},
        {"levels": "symmetric", "granularity": "kernel"},
        {"levels": "asymmetric", "granularity": "channel", "method": "mse"},
    ],
    ids=lambda d: "-".join(str(v) for v in d.values()),
)
def test_every_weight_quantizer_exports_exactly(tiny_run, tiny_cfg, tmp_path, wq):
    """Grouped scales, kernel-position scales and asymmetric levels: the packed folder stores exactly what the cost
    model prices (scales and offsets at the export's fp32) and draws the fake-quant images bit for bit."""
    from mpq.quant.quantizer import WeightQuant
    from mpq.quant.structure import Structure

    spec = WeightQuant(**wq)
    pipe, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    st = Structure(
        {n: lay.act_numel for n, lay in qm.layers.items()},
        {n: lay.in_split for n, lay in qm.layers.items()},
        {n for n, lay in qm.layers.items() if lay.bos_aware},
    )
    qm.prepare([2, 4, 8], False, st, spec)
    for layer in qm.layers.values():
        layer.calibrate_weight()
    rng = random.Random(1)
    plan = BitPlan({n: rng.choice([2, 4, 8]) for n in qm.names if rng.random() > 0.1})
    tensors = denoiser_export(qm, plan, torch.float32)[0]
    paths = [n[len(PREFIX) :] for n in qm.names]
    infos = describe(qm, [])
    assert weight_bytes_of(tensors, paths) == CostModel(4, 4, spec).plan_cost(plan, infos).weight_bytes
    mixdq = CostModel(4, 4).plan_cost(plan, infos).weight_bytes
    assert weight_bytes_of(tensors, paths) > mixdq  # finer or two-parameter layouts store more
    qm.apply(plan)
    ref = generate(pipe, PROMPTS, [0, 1], tiny_cfg, output_type="np")
    out = tmp_path / "export"
    with export_folder(out, "mpq", tiny_run.root) as folder:
        export_mpq(pipe, qm, plan, folder, tiny_cfg, torch.float32)
    loaded = load_quantized(out)
    for a, b in zip(ref, generate(loaded, PROMPTS, [0, 1], tiny_cfg, output_type="np")):
        np.testing.assert_array_equal(a, b)
