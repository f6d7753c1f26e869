"""The Python API and the quantized model as an ordinary torch module."""

import pytest
import torch
from torch import nn

import mpq
from mpq.calibration.record import CalibData
from mpq.metrics import sqnr
from mpq.models import denoiser_of, load_pipeline
from mpq.plan import BitPlan, read_layer_list
from mpq.quant.layers import QuantLinear
from mpq.quant.model import quantizable_modules
from mpq.quant.structure import Structure


def _inputs(run, n=2):
    kwargs, _ = next(CalibData.open(run).batches(n, torch.device("cpu")))
    return kwargs


def _mixed(names):
    return BitPlan({n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}, {n: (4, 8)[i % 2] for i, n in enumerate(names)})


def test_quantize_applies_a_plan_from_mixdq_files_in_place(tiny_run, tiny_cfg, tmp_path):
    pipe = load_pipeline(tiny_cfg)
    unet = denoiser_of(pipe)
    kwargs = _inputs(tiny_run)
    with torch.no_grad():
        fp = unet(**kwargs).sample
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    plan = _mixed(["model." + n for n in names]).protect(["model.conv_in"])
    plan.save(tmp_path, "w.yaml", "a.yaml", "p.pt")
    assert read_layer_list(tmp_path / "p.pt") == ["model.conv_in"]
    loaded = BitPlan.load(tmp_path / "w.yaml", tmp_path / "a.yaml", tmp_path / "p.pt")
    assert loaded == plan and "model.conv_in" not in loaded.act and loaded.weight["model.conv_in"] == 2
    assert (
        "model.conv_in" not in BitPlan.load(tmp_path / "w.yaml", protect=tmp_path / "p.pt", protect_weights=True).weight
    )
    qm = mpq.quantize_(pipe, loaded, tiny_run.ckpt)
    assert isinstance(unet.conv_in, nn.Conv2d) and unet.conv_in.w_bits == 2 and unet.conv_in.a_bits is None
    with torch.no_grad():
        quant = unet(**kwargs).sample
    assert not torch.equal(quant, fp)
    qm.set_fp()
    with torch.no_grad():
        assert torch.equal(unet(**kwargs).sample, fp)  # FP again, bit for bit
    with pytest.raises(mpq.MpqError, match="3 bits"):
        qm.apply(BitPlan({"model.conv_in": 3}))


def test_quantized_model_moves_casts_and_saves_like_any_module(tiny_run, tiny_cfg):
    unet = denoiser_of(load_pipeline(tiny_cfg))
    qm = mpq.quantize_(unet, _mixed(list(quantizable_modules(unet))), tiny_run.ckpt)
    kwargs = _inputs(tiny_run)
    with torch.no_grad():
        ref = unet(**kwargs).sample
    state = unet.state_dict()
    assert sum(k.endswith(".w_scale") for k in state) == 123 and all(
        f"conv_in.{b}" in state for b in ("a_scale", "a_zero", "a_range", "qbits")
    )
    # a fresh model, wrapped and loaded through the ordinary state_dict: the same outputs
    other = denoiser_of(load_pipeline(tiny_cfg))
    oqm = mpq.QuantizedModel(other)
    oqm.prepare(
        [2, 4, 8],
        False,
        Structure(
            in_split={n: l.in_split for n, l in qm.layers.items()}, bos={n for n, l in qm.layers.items() if l.bos_aware}
        ),
        qm.weight_quant,  # the same weight quantizer: the same scale layout
    )
    other.load_state_dict(state)
    oqm.apply(_mixed(oqm.names))
    with torch.no_grad():
        assert torch.equal(other(**kwargs).sample, ref)
    qm.apply(BitPlan.uniform(qm.names, 8, 8))
    with torch.no_grad():
        ref8 = unet(**kwargs).sample
    unet.to(torch.float64)  # .to() / .double() / .half() go through nn.Module._apply
    assert unet.conv_in.w_scale.dtype == torch.float64 and unet.conv_in.weight.dtype == torch.float64
    with torch.no_grad():
        out64 = unet(
            **{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        ).sample
    # the same W8A8 model in float64: equal up to the few values that round to the other side of a quantization step
    assert out64.dtype == torch.float64 and sqnr(out64.float(), ref8) > 30.0
    unet.half()
    assert (
        unet.conv_in.weight.dtype == torch.float16 and unet.conv_in.weight_at(4).dtype == torch.float16
    )  # no stale cached weight
    unet.to("meta")  # a device move: the same path as .cuda()
    assert unet.conv_in.w_scale.device.type == "meta" and unet.conv_in.weight_at(8).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_model_runs_after_cuda(tiny_run, tiny_cfg):
    unet = denoiser_of(load_pipeline(tiny_cfg))
    mpq.quantize_(unet, BitPlan.uniform(list(quantizable_modules(unet)), 4, 8), tiny_run.ckpt)
    unet.cuda()
    with torch.no_grad():
        unet(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _inputs(tiny_run).items()})


def test_quantized_model_works_under_accelerate_cpu_offload(tiny_run, tiny_cfg):
    from accelerate import cpu_offload

    unet = denoiser_of(load_pipeline(tiny_cfg))
    plan = _mixed(list(quantizable_modules(unet)))
    mpq.quantize_(unet, plan, tiny_run.ckpt)
    kwargs = _inputs(tiny_run)
    with torch.no_grad():
        ref = unet(**kwargs).sample
    cpu_offload(
        unet, execution_device=torch.device("cpu")
    )  # weights (and quant buffers) live off-model, loaded per call
    assert unet.conv_in.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(unet(**kwargs).sample, ref)


def test_forward_hooks_and_the_prefix_cache(tiny_run, tiny_cfg):
    from mpq.sensitivity.prefix_cache import PrefixCache

    unet = denoiser_of(load_pipeline(tiny_cfg))
    mpq.quantize_(unet, BitPlan(), tiny_run.ckpt)
    seen = []
    handle = unet.conv_in.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        unet(**_inputs(tiny_run))
    assert seen  # ordinary hooks fire on quantized layers
    with pytest.raises(mpq.MpqError, match="sensitivity.method=naive"):
        PrefixCache(unet)  # it would bypass the hook: it refuses instead of mis-caching
    handle.remove()
    PrefixCache(unet).close()


def test_quant_layer_keeps_its_float_module_state():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_float(lin)
    q.init_quant([4, 8])
    assert q.weight is lin.weight and "qbits" in q.state_dict() and "qbits" not in lin.state_dict()
