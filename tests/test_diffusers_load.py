"""diffusers' own loaders on mpq exports: after ``import mpq``, ``DiffusionPipeline.from_pretrained(export)`` and the
denoiser class's ``from_pretrained`` load ``--format mpq`` folders (packed layers, the images of ``load_quantized``,
its one-line errors); the ``--format torchao`` config through ``PipelineQuantizationConfig`` with its recorded
``torch_dtype``."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter

import diffusers
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

import mpq
from mpq.calibration.checkpoint import quantized_pipeline
from mpq.calibration.ptq import run_ptq
from mpq.calibration.record import run_calibration
from mpq.errors import MpqError
from mpq.export.diffusers_hub import SUPPORTED, MpqMethod, register
from mpq.export.folder import export_folder
from mpq.export.mpq_format import export_mpq, load_denoiser, load_quantized
from mpq.export.packed import PackedLayer
from mpq.images import generate
from mpq.models import load_pipeline
from mpq.models.loader import WEIGHTS_DIR
from mpq.plan import BitPlan
from mpq.quant.model import PREFIX
from mpq.runner.config import load_config
from mpq.runner.rundir import RunDir

from conftest import repo_root

PROMPTS = ["a small red circle at the top left on a white background", "a large blue square in the center"]
QUANT_PARAMS = ("w_scale", "w_offset", "a_scale", "a_zero", "bos_in", "bos_out")


def mixed_plan(qm, seed: int = 0) -> BitPlan:
    """2/4/8-bit weights, 4/8-bit activations, FP layers on both sides, two act-protected layers."""
    rng = random.Random(seed)
    names = qm.names
    weight = {n: rng.choice([2, 4, 8]) for n in names if rng.random() > 0.1}
    act = {n: rng.choice([4, 8, 8]) for n in names if rng.random() > 0.1}
    return BitPlan(weight, act).protect(names[3:5])


def export(pipe, qm, cfg, run, out, fp_dtype, component):
    plan = mixed_plan(qm)
    qm.apply(plan)
    with export_folder(out, "mpq", run.root) as folder:
        export_mpq(pipe, qm, plan, folder, cfg, fp_dtype, component)
    return out


def images(pipe, cfg) -> list[torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)
    return generate(pipe, PROMPTS, [0, 1], cfg, output_type="pt")


def assert_same_images(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == len(PROMPTS)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_packed(denoiser, qconfig) -> None:
    """The quantized layers are PackedLayers holding uint8 codes and fp32 quant params, no FP weight."""
    packed = {n: m for n, m in denoiser.named_modules() if isinstance(m, PackedLayer)}
    assert set(packed) == set(qconfig["layers"])
    quantized = [n for n, spec in qconfig["layers"].items() if spec["w_bits"] is not None]
    assert quantized
    for name in quantized:
        m = packed[name]
        assert m.qweight.dtype == torch.uint8 and "weight" not in m._parameters
        assert all(t.dtype == torch.float32 for leaf, t in m.named_buffers() if leaf in QUANT_PARAMS)


def same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def sdxl_export(tiny_run, tiny_cfg, tmp_path_factory):
    """The embedded SDXL-like model's mixed plan, exported with the FP parts in fp16 (the CLI default)."""
    pipe, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    return export(pipe, qm, tiny_cfg, tiny_run, tmp_path_factory.mktemp("sdxl") / "out", torch.float16, "unet")


def test_import_mpq_registers_without_importing_diffusers():
    code = (
        "import sys, mpq; assert 'diffusers' not in sys.modules; "
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING as q, AUTO_QUANTIZATION_CONFIG_MAPPING as c; "
        "print(q['mpq'].__name__, c['mpq'].__name__)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["MpqQuantizer", "MpqConfig"]
    register()  # idempotent: the same classes stay registered
    from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["mpq"] is mpq.export.diffusers_hub.MpqQuantizer


def test_pipeline_from_pretrained_draws_the_load_quantized_images(sdxl_export, tiny_cfg):
    pipe = DiffusionPipeline.from_pretrained(sdxl_export, torch_dtype=torch.float32)
    qconfig = json.loads((sdxl_export / "unet" / "config.json").read_text())["quantization_config"]
    assert_packed(pipe.unet, qconfig)
    assert pipe.unet.mpq_quantization_config == qconfig
    method = pipe.unet.config.quantization_config.quant_method
    assert isinstance(method, MpqMethod) and method == "mpq" and method.value == "mpq"  # diffusers' str Enum use
    assert json.loads(pipe.unet.to_json_string())["quantization_config"] == qconfig
    ref = load_quantized(sdxl_export)
    assert_same_images(images(pipe, tiny_cfg), images(ref, tiny_cfg))


def test_denoiser_class_from_pretrained_is_load_denoiser(sdxl_export):
    """Same tensors, dtypes and modules in every compute dtype: FP parts cast, quant params kept fp32."""
    for dtype in (None, torch.float16):
        unet = UNet2DConditionModel.from_pretrained(sdxl_export / "unet", torch_dtype=dtype)
        ref = load_denoiser(sdxl_export / "unet", dtype or torch.float32)
        same_state(unet, ref)
        assert [type(m) for m in unet.modules()] == [type(m) for m in ref.modules()]
        assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    with pytest.warns(UserWarning, match="export folder is its serialized form"), pytest.raises(ValueError):
        unet.save_pretrained(sdxl_export.parent / "again")


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_transformer_families(family, tmp_path):
    """A DiT (PixArt: its position table is a non-persistent buffer the export stores) and an MMDiT (Flux)."""
    small = ["calib.num_samples=4", "calib.batch_size=8", "sampling.batch_size=4", "model.device=cpu"]
    cfg = load_config(f"tiny-{family}-random", small)
    run = RunDir(tmp_path / "run")
    run.save_config(cfg)
    pipe = load_pipeline(cfg)
    run_calibration(cfg, run, pipe)
    run_ptq(cfg, run, pipe)
    pipe, qm, _ = quantized_pipeline(cfg, run)
    out = export(pipe, qm, cfg, run, tmp_path / "out", torch.float32, "transformer")
    loaded = DiffusionPipeline.from_pretrained(out)
    qconfig = json.loads((out / "transformer" / "config.json").read_text())["quantization_config"]
    assert_packed(loaded.transformer, qconfig)
    assert_same_images(images(loaded, cfg), images(load_quantized(out), cfg))
    cls = getattr(diffusers, type(loaded.transformer).__name__)
    same_state(cls.from_pretrained(out / "transformer"), load_denoiser(out / "transformer"))


def _tamper(folder, edit_config=None, edit_tensors=None) -> None:
    cfg_path, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if edit_config:
        config = json.loads(cfg_path.read_text())
        edit_config(config["quantization_config"])
        cfg_path.write_text(json.dumps(config))
    if edit_tensors:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(weights))
        edit_tensors(tensors)
        save_file(tensors, str(weights), metadata=meta)


def test_bad_folders_fail_as_load_denoiser_does(sdxl_export, tmp_path):
    qconfig = json.loads((sdxl_export / "unet" / "config.json").read_text())["quantization_config"]
    layer = next(n for n, s in qconfig["layers"].items() if s["w_bits"] == 4)

    def set_w_bits(q, bits=2):
        q["layers"][layer]["w_bits"] = bits

    def flip(tensors):
        tensors[f"{layer}.qweight"][0] ^= 1

    cases = {
        "export format 'mpq-packed/9'": dict(edit_config=lambda q: q.update(format="mpq-packed/9")),
        "written by an older mpq": dict(edit_config=lambda q: (q.update(format="mpq-packed/1"), set_w_bits(q, 3))),
        f"layer '{layer}' field 'w_bits' was changed after export": dict(edit_config=set_w_bits),
        "checksum mismatch": dict(edit_tensors=flip),
        "no 'layers' mapping": dict(edit_config=lambda q: q.pop("layers")),
    }
    for i, (message, edit) in enumerate(cases.items()):
        folder = tmp_path / str(i)
        shutil.copytree(sdxl_export / "unet", folder)
        _tamper(folder, **edit)
        with pytest.raises(MpqError) as ours:
            UNet2DConditionModel.from_pretrained(folder)
        with pytest.raises(MpqError) as theirs:
            load_denoiser(folder)
        assert str(ours.value) == str(theirs.value) and message in str(ours.value) and "\n" not in str(ours.value)
    pipe_folder = tmp_path / "pipe"
    shutil.copytree(sdxl_export, pipe_folder)
    _tamper(pipe_folder / "unet", edit_tensors=flip)
    with pytest.raises(MpqError, match="checksum mismatch"):
        DiffusionPipeline.from_pretrained(pipe_folder)


def test_every_component_is_hashed_and_a_lost_hash_is_damage(sdxl_export, tiny_cfg, tmp_path):
    """A flipped byte in the VAE, a component file gone, a denoiser re-saved without its metadata (one scale
    tripled), hashes cut from the config: each refused by every loader in one line. An export of the version before
    component hashes still loads."""
    vae = "vae/diffusion_pytorch_model.safetensors"

    def flip_vae(folder):
        data = bytearray((folder / vae).read_bytes())
        data[-3] ^= 0x10  # a weight's byte, not the header
        (folder / vae).write_bytes(bytes(data))

    def resave_without_metadata(folder):
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(weights))
        key = next(k for k in sorted(tensors) if k.endswith(".w_scale"))
        tensors[key] = tensors[key] * 3
        save_file(tensors, str(weights))

    def edit_qconfig(edit):
        def apply(folder):
            cfg_path = folder / "unet" / "config.json"
            config = json.loads(cfg_path.read_text())
            edit(config["quantization_config"])
            cfg_path.write_text(json.dumps(config))

        return apply

    cases = {
        f"{vae}: checksum mismatch": flip_vae,
        "vae/config.json is missing from the export": lambda f: (f / "vae" / "config.json").unlink(),
        "its metadata lacks mpq_sha256, which mpq-packed/4 writes": resave_without_metadata,
        "no 'components' hashes, which mpq-packed/4 writes": edit_qconfig(lambda q: q.pop("components")),
    }
    for i, (message, damage) in enumerate(cases.items()):
        folder = tmp_path / str(i)
        shutil.copytree(sdxl_export, folder)
        damage(folder)
        loaders = [lambda: load_quantized(folder)]
        if "is missing" not in message:  # (diffusers may reach the missing file first and say so itself)
            loaders.append(lambda: DiffusionPipeline.from_pretrained(folder))
        if "metadata" in message:
            loaders.append(lambda: UNet2DConditionModel.from_pretrained(folder / "unet"))
        for load in loaders:
            with pytest.raises(MpqError) as err:
                load()
            assert message in str(err.value) and "\n" not in str(err.value), (message, str(err.value))
    older = tmp_path / "older"  # written by the version before component hashes: loads as it did
    shutil.copytree(sdxl_export, older)
    edit_qconfig(lambda q: (q.pop("components"), q.update(format="mpq-packed/3")))(older)
    assert_same_images(
        images(load_quantized(older), tiny_cfg),
        images(load_quantized(sdxl_export), tiny_cfg),
    )


def test_unsupported_uses_are_one_line_errors(sdxl_export, monkeypatch):
    from diffusers.quantizers import auto
    from diffusers.quantizers.base import DiffusersQuantizer

    MpqConfig = mpq.export.diffusers_hub.MpqConfig
    with pytest.raises(MpqError, match="only loads `mpq export` folders"):  # an FP model: mpq does not quantize here
        UNet2DConditionModel.from_pretrained(WEIGHTS_DIR / "tiny-sdxl" / "unet", quantization_config=MpqConfig())
    monkeypatch.setitem(auto.AUTO_QUANTIZER_MAPPING, "mpq", DiffusersQuantizer)
    with pytest.raises(MpqError, match="already diffusers.quantizers.base.DiffusersQuantizer"):
        register()
    monkeypatch.undo()
    monkeypatch.delattr(DiffusersQuantizer, "maybe_update_loaded_keys")  # as in diffusers < 0.39
    with pytest.raises(MpqError, match=f"mpq exports load with from_pretrained on {SUPPORTED}") as err:
        UNet2DConditionModel.from_pretrained(sdxl_export / "unet")
    assert "\n" not in str(err.value) and "mpq.load_quantized" in str(err.value)


def test_torchao_export_through_pipeline_quantization_config(tiny_run, tiny_cfg, tmp_path):
    """diffusers' TorchAoConfig path with the export's recorded dtype: it runs (diffusers' bfloat16 default for the
    denoiser alone fails on fp32 components), and quantizes exactly what the export reports: every Linear as
    planned, Conv2d never (diffusers' torchao quantizer converts nn.Linear weights only)."""
    tq = pytest.importorskip("torchao.quantization")
    if not hasattr(tq, "FqnToConfig") or not hasattr(diffusers, "PipelineQuantizationConfig"):
        pytest.skip("needs torchao's FqnToConfig and diffusers' PipelineQuantizationConfig")
    from mpq.export.torchao_format import export_torchao, from_pretrained_kwargs, load_torchao, torchao_plan

    _, qm, _ = quantized_pipeline(tiny_cfg, tiny_run)
    plan = mixed_plan(qm, seed=1)
    plan = BitPlan(plan.weight, {**plan.act, **{n: 8 for n, w in plan.weight.items() if w == 8}})  # W8A8 layers too
    out = tmp_path / "tao"
    with export_folder(out, "torchao", tiny_run.root) as folder:
        info = export_torchao(qm, plan, folder, str(tiny_cfg.model.id))
    data = json.loads((out / "torchao_config.json").read_text())
    assert data["torch_dtype"] == "float32" and data["component"] == "unet"
    counts = info["from_pretrained_layers"]
    assert counts == data["from_pretrained_layers"] and set(counts) == {
        "FP",
        "Int8DynamicActivationInt8WeightConfig",
        "IntxWeightOnlyConfig",
    }
    kwargs = from_pretrained_kwargs(out)
    assert kwargs["torch_dtype"] == torch.float32
    pipe = DiffusionPipeline.from_pretrained(WEIGHTS_DIR / "tiny-sdxl", **kwargs)
    choice = {r["layer"][len(PREFIX) :]: r["torchao"].split("(")[0] for r in torchao_plan(qm, plan)[1]}
    seen: Counter[str] = Counter()
    for name, m in pipe.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            expected = choice[name] if isinstance(m, torch.nn.Linear) else "FP"
            assert (type(m.weight).__name__ == "Parameter") == (expected == "FP"), name
            seen[expected] += 1
    assert dict(seen) == counts and seen["FP"] > sum(isinstance(m, torch.nn.Conv2d) for m in pipe.unet.modules())
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())
    assert len(images(pipe, tiny_cfg)) == len(PROMPTS)  # no "mat1 and mat2 must have the same dtype"
    # mpq's own path computes in the recorded dtype too: a bf16 pipeline is cast before quantize_
    bf16 = load_torchao(out, load_pipeline(tiny_cfg, dtype=torch.bfloat16))
    assert bf16.unet.dtype == torch.float32 and bf16.text_encoder.dtype == torch.float32
