"""Every denoiser family end to end: tiny random PixArt (T5, CFG, DPM-Solver), SD3 (MMDiT, flow matching, CFG) and
Flux (MMDiT, shared token positions, no guidance); guidance and several steps on the UNet; scheduler checks; the
shipped architectures on the meta device; one-line errors for what is not supported."""

from __future__ import annotations

import contextlib
import io
import json
import math

import diffusers
import numpy as np
import pytest
import torch
from torch import nn

import mpq
from mpq.calibration.checkpoint import run_layers
from mpq.calibration.record import CalibData
from mpq.commands.main import main
from mpq.errors import MpqError
from mpq.families import FAMILIES, family_of
from mpq.images import generate
from mpq.layers import meta_layers
from mpq.models import load_pipeline
from mpq.models.loader import ARCH_DIR
from mpq.plan import final_plan
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir
from mpq.search.mixdq_files import read_sensitivity

# every stage, at the smallest sizes that still give the search a sweep and the selection a choice
TINY_RUN = [
    "calib.num_samples=4",
    "sensitivity.num_images=2",
    "select.num_images=2",
    "infer.num_images=2",
    "eval.num_images=2",
    "search.sweep_steps=2",
    "search.sweep_density=2.0",
    "search.weight.k_num=2",
    "search.act.k_num=2",
    "model.device=cpu",
    "select.refine_evals=6",  # the refinement's path on every family, at a few generations (e2e: the default)
]
PROMPTS = ["a small red circle at the top left on a white background", "a large blue square in the center"]


@pytest.fixture(scope="module", params=["pixart", "sd3", "flux"])
def family_run(request, tmp_path_factory):
    """(family, config, finished run directory) of ``mpq run --config tiny-<family>-random``."""
    name = f"tiny-{request.param}-random"
    run = RunDir(tmp_path_factory.mktemp(request.param) / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", "--config", name, "--outdir", str(run.root), *TINY_RUN]) == 0
    return request.param, load_config(name, TINY_RUN), run


def test_every_stage_runs_and_records_the_calls_as_made(family_run):
    family, cfg, run = family_run
    calib = CalibData.open(run)
    meta = calib.meta
    guided = family != "flux"  # PixArt and SD3 run classifier-free guidance at 4.5; Flux schnell none
    assert meta["family"] == family and meta["steps"] == 2
    assert meta["rows"] == cfg.calib.num_samples * (2 if guided else 1)
    for step in calib.steps:
        key = meta["sample_key"]
        assert step[key].shape[0] == meta["rows"]
        if guided:  # the negative half of each call is really the empty prompt, not a copy of the positive half
            text = step["encoder_hidden_states"]
            half = meta["rows"] // 2
            assert not torch.equal(text[:half], text[half:])
    if family == "flux":  # token positions are stored once, not per row
        assert sorted(meta["shared"]) == ["img_ids", "txt_ids"]
        assert calib.steps[0]["img_ids"].dim() == 2 and calib.steps[0]["img_ids"].shape[-1] == 3
    # the constant-first-token test: CLIP first (SD3) -> the text entry is BOS-aware; T5 (PixArt, Flux) -> none
    bos = [i.name for i in run_layers(cfg, run) if i.bos_aware]
    assert bos == (["model.context_embedder"] if family == "sd3" else [])
    # sensitivity over every layer, both steps: 8-bit weights beat 2-bit on nearly every layer
    sqnr = read_sensitivity(run.sensitivity_file("weight", "sqnr"), 3)
    better = sum(v[2] > v[0] for v in sqnr.values())
    assert len(sqnr) == len(run_layers(cfg, run)) and better >= 0.9 * len(sqnr)
    ssim = read_sensitivity(run.sensitivity_file("weight", "ssim"), 3)
    content = {i.name for i in run_layers(cfg, run) if i.group == "content"}
    assert set(ssim) == content and content
    plan = final_plan(run)
    assert plan.weight and plan.act


def test_default_content_group_follows_the_family(family_run):
    family, cfg, run = family_run
    content = [i.name for i in run_layers(cfg, run) if i.group == "content"]
    if family == "pixart":
        assert all(".attn2." in n or ".ff." in n or "caption_projection" in n for n in content)
        assert any(".attn2.to_k" in n for n in content)
    else:  # MMDiT: the text stream and the image FFN; SD3.5's attn2 is image self-attention -> quality
        text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")
        assert all(any(p in n.split(".") for p in (*text, "ff")) or n == "model.context_embedder" for n in content)
        assert any(".ff.net." in n for n in content) and any(".ff_context." in n for n in content)
        quality = [i.name for i in run_layers(cfg, run) if i.group == "quality"]
        assert any(".attn.to_q" in n for n in quality)
        if family == "sd3":
            assert any(".attn2." in n for n in quality)
        if family == "flux":
            assert all("single_transformer_blocks" not in n for n in content)


def test_export_under_its_component_loads_and_draws_the_fake_quant_images(family_run, tmp_path):
    family, cfg, run = family_run
    plan = final_plan(run)
    pipe = load_pipeline(cfg)
    mpq.quantize_(pipe, plan, run.ckpt)  # the torchao-style verb works on every family's pipeline
    ref = generate(pipe, PROMPTS, [0, 1], cfg, output_type="np")
    out = tmp_path / "export"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--base_path", str(run.root), "--out", str(out), "--fp-dtype", "fp32"]) == 0
    assert (out / "transformer" / "config.json").is_file() and not (out / "unet").exists()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        # AIMET's encodings hold symmetric per-channel weights: the default quantizer's are a one-line refusal
        assert (
            main(["export", "--base_path", str(run.root), "--out", str(tmp_path / "enc"), "--format", "encodings"]) == 2
        )
    assert "quant.weight.levels=symmetric" in err.getvalue() and not (tmp_path / "enc").exists()
    loaded = mpq.load_quantized(out)
    assert type(loaded.transformer).__name__ == FAMILIES[type(pipe.transformer).__name__].denoiser_class
    images = generate(loaded, PROMPTS, [0, 1], cfg, output_type="np")
    for a, b in zip(ref, images, strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical in fp32
    fp = generate(load_pipeline(cfg), PROMPTS, [0, 1], cfg, output_type="np")
    assert any(not np.array_equal(a, b) for a, b in zip(ref, fp))  # the plan really quantizes


def test_an_sdnq_export_loads_without_mpq_and_draws_the_simulated_images(family_run, tmp_path):
    """A mixed plan of SDNQ dtypes (nothing calibrated for them) exported with `--format sdnq` loads in a process
    that never imports mpq, through stock diffusers, and draws mpq's simulation of the plan (fp32: max abs < 1e-5)."""
    from test_sdnq import mixed_plan

    from mpq.plan import write_plan

    from conftest import sdnq_draws_the_simulation

    family, cfg, run = family_run
    if family == "flux":  # the same check on the same model: test_sdnq's target=sdnq run exports and loads it
        pytest.skip("tiny Flux's SDNQ export is loaded without mpq by test_sdnq's target=sdnq run")
    plan = mixed_plan([i.name for i in run_layers(cfg, run)], seed=2)
    plan_file = write_plan(tmp_path / "plan.formats.yaml", plan.weight)
    out = tmp_path / "sdnq"
    argv = ["export", "--base_path", str(run.root), "--out", str(out), "--format", "sdnq", "--fp-dtype", "fp32"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--weight-plan", str(plan_file)]) == 0
    diff, effect = sdnq_draws_the_simulation(cfg, run, out, plan, tmp_path)
    assert diff < 1e-5 and effect > 100 * diff, (family, diff, effect)


def test_fisher_estimate_runs_on_every_family(family_run):
    """The Fisher estimator's denoising loss in each family's layout: PixArt (epsilon, learned variance, DPM-Solver),
    SD3 (flow), Flux (flow, packed latents, sigma as the timestep)."""
    from mpq.sensitivity.stage import compute_sensitivity

    family, cfg, run = family_run
    for kind in ("weight", "act"):
        est = compute_sensitivity(cfg, run, kind, "sqnr", "fisher", show=False, write=False)
        values = [v for vals in est.values() for v in vals]
        assert est and all(math.isfinite(v) or v == math.inf for v in values)
        monotone = sum(vals[0] <= vals[1] <= vals[2] for vals in est.values()) / len(est)
        assert monotone >= 0.8, (family, kind, monotone)


def test_trace_of_an_fp32_export_equals_its_fake_quant_plan_everywhere(family_run, tmp_path):
    from mpq.trace import compare_dumps, read_trace

    family, cfg, run = family_run
    out = tmp_path / "export"
    common = ["--base_path", str(run.root), "--prompt", PROMPTS[0], "--seed", "3"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "--base_path", str(run.root), "--out", str(out), "--fp-dtype", "fp32"]) == 0
        assert main(["trace", *common, "--out", str(tmp_path / "a"), "--dump", str(tmp_path / "da")]) == 0
        assert (
            main(["trace", *common, "--export", str(out), "--out", str(tmp_path / "b"), "--dump", str(tmp_path / "db")])
            == 0
        )
    result = compare_dumps(tmp_path / "da", tmp_path / "db", tol_cos=1.0, tol_sqnr=math.inf)
    assert result.first is None and all(r["max_abs"] == 0 for r in result.rows)  # no difference anywhere
    a, b = read_trace(tmp_path / "a" / "trace.json"), read_trace(tmp_path / "b" / "trace.json")
    for mode in ("end_to_end", "isolated"):
        assert a["layers"][mode] == b["layers"][mode] and a["components"][mode] == b["components"][mode]
    steps = [r for r in a["components"]["end_to_end"] if r["component"] == "scheduler"]
    denoiser = [r for r in a["components"]["end_to_end"] if r["component"] == "transformer"]
    assert len(steps) == len(denoiser) == cfg.sampling.steps
    assert all(math.isfinite(r["sqnr_db"]) for r in denoiser)  # the plan quantizes: the denoiser departs
    assert a["fed_fp"] and a["first_departure"]["isolated"] is not None


# ----------------------------------------------------------------------------- the UNet with guidance, many steps
def test_unet_with_guidance_and_steps_runs_through_sensitivity(tmp_path):
    from conftest import THREE_WIDTHS

    over = [
        "sampling.guidance_scale=3",
        "sampling.steps=2",
        "calib.num_samples=4",
        "sampling.batch_size=4",
        "sensitivity.num_images=2",
        "model.device=cpu",
        'sensitivity.layers=["*down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k","*conv_out"]',
        *THREE_WIDTHS,
    ]
    run = RunDir(tmp_path / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sensitivity", "--config", "tiny-sdxl", "--outdir", str(run.root), *over]) == 0
    calib = CalibData.open(run)
    assert calib.meta["rows"] == 8 and len(calib.steps) == 2  # both halves of every CFG call, every step
    sqnr = read_sensitivity(run.sensitivity_file("weight", "sqnr"), 3)
    assert sorted(sqnr) == ["model.conv_out", "model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert all(v[2] > v[1] > v[0] for v in sqnr.values())
    ssim = read_sensitivity(run.sensitivity_file("weight", "ssim"), 3)
    assert list(ssim) == ["model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    # the BOS row is constant for real prompts; SDXL zeroes the empty negative prompt, which does not count
    info = {i.name: i for i in run_layers(load_config("tiny-sdxl", over), run)}
    assert info["model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].bos_aware
    assert not info["model.conv_out"].bos_aware


def test_guided_unet_export_matches_fake_quant(tmp_path):
    """Under CFG the zeroed negative rows reach the BOS-cached layers: the export must still match bit for bit."""
    from mpq.calibration.ptq import run_ptq
    from mpq.calibration.record import run_calibration
    from mpq.export.folder import export_folder
    from mpq.export.mpq_format import export_mpq
    from mpq.quant.model import QuantModel

    cfg = load_config("tiny-sdxl", ["sampling.guidance_scale=2", "sampling.steps=2", "calib.num_samples=4"])
    run = RunDir(tmp_path / "run")
    pipe = load_pipeline(cfg)
    run_calibration(cfg, run, pipe)
    run_ptq(cfg, run, pipe)
    pipe = load_pipeline(cfg)
    qm = mpq.quantize_(pipe, mpq.BitPlan.uniform(QuantModel(pipe.unet).names, 4, 8), run.ckpt)
    ref = generate(pipe, PROMPTS, [0, 1], cfg, output_type="np")
    with export_folder(tmp_path / "out", "mpq", run.root) as folder:
        info = export_mpq(pipe, qm, mpq.BitPlan.uniform(qm.names, 4, 8), folder, cfg, torch.float32)
    assert info["bos_cached"] > 0
    images = generate(mpq.load_quantized(tmp_path / "out"), PROMPTS, [0, 1], cfg, output_type="np")
    for a, b in zip(ref, images, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- schedulers
def test_flow_matching_scheduler_is_kept_and_wrong_overrides_refused():
    cfg = load_config("tiny-sd3-random", ["model.device=cpu"])
    assert type(load_pipeline(cfg).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for choice in ("euler_ancestral", "ddim"):
        with pytest.raises(MpqError, match="flow-matching") as err:
            load_pipeline(load_config("tiny-sd3-random", [f"sampling.scheduler={choice}", "model.device=cpu"]))
        assert "\n" not in str(err.value) and "sampling.scheduler=keep" in str(err.value)
    with pytest.raises(MpqError, match="flow_euler"):
        load_pipeline(load_config("tiny-sdxl-random", ["sampling.scheduler=flow_euler", "model.device=cpu"]))
    # an override of the right kind is applied
    pipe = load_pipeline(load_config("tiny-pixart-random", ["sampling.scheduler=ddim", "model.device=cpu"]))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_scheduler_override_is_one_line_on_the_command_line(tmp_path, capsys):
    argv = ["calib", "--config", "tiny-flux-random", "--outdir", str(tmp_path / "r"), "sampling.scheduler=euler"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mpq: error:") and "flow-matching" in err[-1]
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------- unsupported
def test_unsupported_denoiser_is_one_line(tmp_path, capsys):
    class Mystery(nn.Module):
        pass

    with pytest.raises(MpqError) as err:
        family_of(Mystery())
    msg = str(err.value)
    assert "Mystery" in msg and all(f.denoiser_class in msg for f in FAMILIES.values()) and "\n" not in msg
    folder = tmp_path / "dit"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["d", "x"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    assert main(["layers", "--config", "tiny-sdxl", "--meta", f"model.id={folder}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "DiTTransformer2DModel" in line and "FluxTransformer2DModel" in line


# ----------------------------------------------------------------------------- the shipped architectures
@pytest.mark.parametrize(
    ("config", "n_layers"),
    [
        ("sd15", 282),
        ("sdxl-base", 794),
        ("sdxl-turbo", 794),
        ("pixart-sigma", 287),
        ("sd35-medium", 393),
        ("flux-schnell", 502),
    ],
)
def test_meta_layers_are_exactly_the_linear_and_conv_modules(config, n_layers):
    cfg = load_config(config)
    arch_file = ARCH_DIR / (cfg.model.id.replace("/", "--") + ".json")
    den = json.loads(arch_file.read_text())["denoiser"]
    with torch.device("meta"):
        model = getattr(diffusers, den["_class_name"]).from_config({k: v for k, v in den.items() if k[0] != "_"})
    expected = ["model." + n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    infos = meta_layers(cfg)
    assert [i.name for i in infos] == expected and len(expected) == n_layers
    assert all(i.act_numel > 0 for i in infos)
    content = [i.name for i in infos if i.group == "content"]
    family = family_of(den["_class_name"]).name
    assert content and len(content) < len(infos)
    if family in ("sd3", "flux"):
        assert not any(".attn2." in n for n in content)
    else:
        assert all(".attn2." in n or ".ff." in n or "caption_projection" in n for n in content)


def test_constant_first_token_tolerates_rounding_and_zero_rows_but_not_prompts():
    from mpq.quant.structure import constant_first_token

    g = torch.Generator().manual_seed(0)
    bos = torch.randn(1, 1, 16, generator=g) * 20  # an outlier row, the same for every prompt
    rest = torch.randn(6, 7, 16, generator=g)
    text = torch.cat([bos.expand(6, 1, 16), rest], dim=1)
    assert constant_first_token(text)
    zeroed = torch.cat([torch.zeros(2, 8, 16), text])  # SDXL's zeroed negative prompt: no first token at all
    assert constant_first_token(zeroed)
    half = text.half()
    v = half[3, 0, 5].float()
    half[3, 0, 5] = (v + 2.0 ** (torch.floor(torch.log2(v.abs())) - 10)).half()  # one fp16 rounding step
    assert not torch.equal(half[3, 0], half[0, 0])
    assert constant_first_token(half)
    varied = text.clone()
    varied[2, 0] += 0.5  # a first token that depends on the prompt (T5)
    assert not constant_first_token(varied)
    assert not constant_first_token(text[:1])  # one prompt cannot tell
