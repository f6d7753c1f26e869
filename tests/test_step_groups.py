"""Timestep-aware activation ranges (``quant.act.step_groups``): calibrated per group of steps, picked by each call's
timestep, kept by the checkpoint and the packed export bit for bit, on tiny-sd3 (several sampling steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpq.calibration.checkpoint import quantized_pipeline
from mpq.calibration.ptq import run_ptq
from mpq.calibration.record import OUTPUT_KEY, CalibData, run_calibration, unflatten
from mpq.errors import MpqError
from mpq.export.folder import export_folder
from mpq.export.mpq_format import export_mpq, load_quantized
from mpq.export.packed import PackedLayer
from mpq.images import generate
from mpq.metrics import SqnrAccumulator
from mpq.models import load_pipeline
from mpq.plan import BitPlan
from mpq.quant.model import PREFIX
from mpq.quant.steps import group_of, step_bounds
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir

from conftest import THREE_WIDTHS

SIZES = ["sampling.steps=3", "calib.num_samples=4", "calib.batch_size=8", "sampling.batch_size=4", "model.device=cpu"]
PROMPT = ["a small red circle in the center on a white background"]


def test_bounds_cut_the_timesteps_into_even_runs():
    assert step_bounds([1000, 858, 602, 9], 1) == []
    assert step_bounds([1000, 858, 602, 9], 2) == [730.0]
    assert step_bounds([1000.0, 858.0, 602.0, 9.0, 9.0], 4) == [305.5, 730.0, 929.0]  # repeats count once
    assert [group_of(t, [305.5, 730.0, 929.0]) for t in (1000, 858, 602, 9, 500)] == [3, 2, 1, 0, 1]
    with pytest.raises(MpqError, match=r"holds 2 distinct timesteps; use at most 2"):
        step_bounds([1.0, 0.5], 3)


def test_a_bad_step_groups_value_is_one_line_and_old_runs_stay_fresh():
    from mpq.runner.config import settings

    with pytest.raises(MpqError, match=r"'quant.act.step_groups' is 0; use 1"):
        load_config("tiny-sd3", ["quant.act.step_groups=0"])
    # runs stamped before step groups existed stay fresh: one group is no key in the stamps' quant section
    assert "step_groups" not in settings(load_config("tiny-sd3"), "quant")["act"]
    assert settings(load_config("tiny-sd3", ["quant.act.step_groups=2"]), "quant")["act"]["step_groups"] == 2


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """A tiny-sd3 run (3 steps) with PTQ at one range per step."""
    cfg = load_config("tiny-sd3", [*SIZES, *THREE_WIDTHS, "quant.act.step_groups=3"])
    run = RunDir(tmp_path_factory.mktemp("steps"))
    run.save_config(cfg)
    pipe = load_pipeline(cfg)
    run_calibration(cfg, run, pipe)
    run_ptq(cfg, run, pipe)
    return cfg, run


def _calls(run: RunDir) -> list[dict]:
    """Each recorded call's denoiser kwargs (every row of one step)."""
    return [unflatten({k: v for k, v in step.items() if k != OUTPUT_KEY}) for step in CalibData.open(run).steps]


def test_each_group_holds_its_own_steps_range(grouped_run):
    """With one step a group and one batch a step, a group's range is exactly the min/max its layer saw at that
    step, while the all-steps range (a running average led by the first step) fits the last step worse."""
    cfg, run = grouped_run
    _, qm, manifest = quantized_pipeline(cfg, run)
    assert manifest["act_quant"]["step_groups"] == 3 and qm.step_groups == 3
    calls = _calls(run)
    times = [float(c["timestep"].reshape(-1)[0]) for c in calls]
    layer = qm.layers[PREFIX + "pos_embed.proj"]  # reads the noisy latents: its range moves with the step
    inputs: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    qm.set_fp()
    with torch.no_grad():
        for kwargs in calls:
            qm(**kwargs, return_dict=False)
    hook.remove()
    bounds = layer.step_bounds()
    assert [group_of(t, bounds) for t in times] == [2, 1, 0]  # the first call (highest timestep) is the top group
    for t, x in zip(times, inputs):
        g = group_of(t, bounds)
        assert float(layer.a_step_range[g, 0, 0]) == float(x.min()) and float(layer.a_step_range[g, 0, 1]) == float(
            x.max()
        )
    spans = [float(x.max() - x.min()) for x in inputs]
    assert max(spans) > 1.2 * min(spans)  # the steps' ranges really differ (else groups could not matter)
    exact = layer.a_step_bounds.tolist()
    qm.denoiser.to(torch.bfloat16)  # a cast keeps the boundaries exact (bf16 would round 929.0 to 928)
    assert layer.a_step_bounds.dtype == torch.float32 and layer.a_step_bounds.tolist() == exact
    assert layer.a_step_scale.dtype == torch.bfloat16  # the rest casts as any module's buffers do


def snr(out: torch.Tensor, ref: torch.Tensor) -> float:
    acc = SqnrAccumulator()
    acc.update(out, ref)
    return acc.value


def test_grouped_ranges_fit_the_last_step_better(grouped_run):
    """At A8 on every layer, the last step's denoiser output is much closer to FP with its own ranges than with the
    all-steps ones, a running average led by the first step that clips the last step's inputs (at A4 clipping can
    pay, so there the groups are for the search to weigh, not a rule)."""
    cfg, run = grouped_run
    _, qm, _ = quantized_pipeline(cfg, run)
    last = _calls(run)[-1]
    with torch.no_grad():
        qm.set_fp()
        ref = qm(**last, return_dict=False)[0]
        qm.apply(BitPlan({}, {n: 8 for n in qm.names}))
        grouped = qm(**last, return_dict=False)[0]
        for layer in qm.layers.values():
            layer.step_groups = 1  # the same checkpoint read as one range for all steps
        single = qm(**last, return_dict=False)[0]
    assert snr(grouped, ref) > snr(single, ref) + 6.0  # measured: 30.8 dB against 13.3


def test_a_call_must_name_one_timestep(grouped_run):
    cfg, run = grouped_run
    _, qm, _ = quantized_pipeline(cfg, run)
    kwargs = _calls(run)[0]
    qm.apply(BitPlan({}, {n: 8 for n in qm.names}))
    mixed = dict(kwargs, timestep=torch.linspace(1000, 0, kwargs["hidden_states"].shape[0]))
    with pytest.raises(MpqError, match="one timestep per denoiser call"):
        qm(**mixed, return_dict=False)
    with pytest.raises(MpqError, match="called without a timestep"):
        qm(**{k: v for k, v in kwargs.items() if k != "timestep"}, return_dict=False)


def test_step_groups_survive_export_and_load_bit_exactly(grouped_run, tmp_path):
    cfg, run = grouped_run
    pipe, qm, _ = quantized_pipeline(cfg, run)
    plan = BitPlan({n: 8 for n in qm.names[::2]}, {n: 4 if i % 3 else 8 for i, n in enumerate(qm.names)})
    qm.apply(plan)
    ref = generate(pipe, PROMPT, [0], cfg, output_type="np")
    out = tmp_path / "export"
    with export_folder(out, "mpq", run.root) as folder:
        export_mpq(pipe, qm, plan, folder, cfg, torch.float32, component="transformer")
    loaded = load_quantized(out)
    packed = {PREFIX + n: m for n, m in loaded.transformer.named_modules() if isinstance(m, PackedLayer)}
    for name, a in plan.act.items():
        m, layer, k = packed[name], qm.layers[name], qm.layers[name].bits.index(a)
        assert m.step_groups == 3
        assert torch.equal(m.a_step_scale, layer.a_step_scale[:, k]) and torch.equal(
            m.a_step_zero, layer.a_step_zero[:, k]
        )
        assert torch.equal(m.a_step_bounds, layer.a_step_bounds)
    got = generate(loaded, PROMPT, [0], cfg, output_type="np")
    np.testing.assert_array_equal(ref[0], got[0])  # fp32: bit-identical images, every step in its own group
    from diffusers import DiffusionPipeline

    hub = DiffusionPipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)  # diffusers' loader, too
    np.testing.assert_array_equal(ref[0], generate(hub, PROMPT, [0], cfg, output_type="np")[0])
    for layer in qm.layers.values():
        layer.step_groups = 1  # the one-range reading of the same checkpoint draws another image
    single = generate(pipe, PROMPT, [0], cfg, output_type="np")
    assert not np.array_equal(single[0], got[0])


def test_the_hook_reads_a_positional_timestep():
    """UNet pipelines call ``unet(latents, t, ...)``: the timestep is found by the forward's signature."""
    from torch import nn

    from mpq.quant.steps import attach

    class Grouped(nn.Module):
        step_groups, a_group = 3, None

        def step_bounds(self) -> list[float]:
            return [100.0, 500.0]

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Grouped()

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None = None) -> None:
            return None

    d = Denoiser()
    attach(d)
    attach(d)  # once: a second call registers nothing
    assert len(d._forward_pre_hooks) == 1
    for t, g in ((torch.tensor(999), 2), (torch.tensor([300.0, 300.0]), 1), (50, 0)):
        d(torch.zeros(2), t)
        assert d.layer.a_group == g


def test_sensitivity_fast_path_runs_and_equals_naive_with_step_groups(grouped_run):
    """The FP prefix cache accepts the step-group hook (it runs in the root call, before the replaced forwards) and
    replays to the same activation SQNR as full forwards."""
    from mpq.sensitivity.stage import compute_sensitivity

    _, run = grouped_run
    cfg = run.load_config(None, ["sensitivity.layers=['*pos_embed*','*transformer_blocks.1.attn.to_q','*proj_out']"])
    naive = compute_sensitivity(cfg, run, "act", "sqnr", "naive", show=False, write=False)
    fast = compute_sensitivity(cfg, run, "act", "sqnr", "fast", show=False, write=False)
    assert naive.keys() == fast.keys() and len(naive) == 3
    for name in naive:
        assert fast[name] == pytest.approx(naive[name], abs=1e-3)


def test_encodings_keep_the_groups_beside_the_all_steps_ranges(grouped_run):
    """AIMET holds one encoding a tensor: the all-steps range there, every group's under ``mpq.step_groups``."""
    from mpq.export.encodings import plan_encodings

    cfg, run = grouped_run
    _, qm, _ = quantized_pipeline(cfg, run)
    data = plan_encodings(qm, BitPlan({}, {n: 8 for n in qm.names}))
    name = PREFIX + "pos_embed.proj"
    layer, key = qm.layers[name], "pos_embed.proj.input"
    groups = data["mpq"]["step_groups"]
    assert groups["groups"] == 3 and groups["timestep_bounds"] == layer.step_bounds()
    assert data["activation_encodings"][key][0]["scale"] == pytest.approx(float(layer.a_scale[-1, 0]))
    per_group = [g[0]["scale"] for g in groups["activation_encodings"][key]]
    assert per_group == pytest.approx([float(v) for v in layer.a_step_scale[:, -1, 0]])
    assert len(set(per_group)) == 3  # the steps' ranges differ
