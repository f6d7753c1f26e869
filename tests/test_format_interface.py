"""One weight path: every weight candidate (the checkpoint's integer widths included) is a ``Format`` that goes
through the same interface, and a new weight-only format is one class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mpq.cost import CostModel, average_bits
from mpq.errors import MpqError
from mpq.export.encodings import plan_encodings
from mpq.export.mpq_format import denoiser_export, weight_bytes_of
from mpq.export.packed import PackedLayer, PackedSpec
from mpq.layers import LayerInfo, describe
from mpq.plan import BitPlan, read_plan, write_plan
from mpq.quant.banks import layout
from mpq.quant.formats import (
    CheckpointInt,
    Format,
    Params,
    ParamShapes,
    nominal_bits,
    parse_format,
    register,
    registered,
    resolve,
    unregister,
    weight_key,
)
from mpq.quant.layers import QuantConv2d
from mpq.quant.model import PREFIX, QuantModel
from mpq.quant.quantizer import WeightQuant

NAMED = [
    "nf7",
    "nf12",
    "nf16",
    "nf24",
    "nf32",
    "fp8",
    "int2-sym-tensor",
    "int3-sym-channel",
    "int4-asym-g64",
    "int5-asym-kernel",
    "int8-sym-g16",
    "sdnq-uint3-g16",  # a runtime's own format (SDNQ's): quantized by its package, exported in its layout
    "sdnq-float8_e4m3fn-row",
    "gguf-q4_0",  # a ggml type, quantized by the gguf package
    "gguf-q5_1",
]
WQS = [WeightQuant(), WeightQuant("asymmetric", "group", 4), WeightQuant("symmetric", "kernel")]
WIDTHS = [(b, wq) for b in (2, 3, 4, 8) for wq in WQS]
SHAPES = [((12, 10, 3, 3), (0, 4, 10)), ((33, 70), (0, 70))]


def _formats() -> list[Format]:
    return [parse_format(n) for n in NAMED] + [resolve(b, wq) for b, wq in WIDTHS]


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_the_list_covers_every_registered_class():
    """A new registered class must join :data:`NAMED` (and so every test below)."""
    assert set(registered()) <= {type(f) for f in _formats()}
    assert all(isinstance(resolve(b, wq), CheckpointInt) for b, wq in WIDTHS)


@pytest.mark.parametrize("shape,split", SHAPES, ids=["conv-split", "linear"])
@pytest.mark.parametrize("fmt", _formats(), ids=lambda f: f"{f.name}-{getattr(f, 'wq', WeightQuant()).label}")
def test_every_format_calibrates_fake_quants_packs_and_prices_through_one_interface(fmt, shape, split):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(fmt.name) + len(shape))) * 0.05
    p = fmt.calibrate(w, split)
    assert weight_key(fmt.name) == fmt.key and resolve(fmt.key, getattr(fmt, "wq", None)) == fmt
    assert 0 < nominal_bits(fmt.key) == fmt.nominal_bits <= 8
    if not fmt.packs:  # a runtime's format: data-free, priced at what its runtime stores, no mpq packing
        fq = fmt.fake_quant(w, p, split)
        assert p == {} and fmt.data_free and fq.dtype == w.dtype and (fq - w).abs().max() < w.abs().max()
        with pytest.raises(MpqError, match=f"{fmt.name} is .*(SDNQ|GGUF)"):
            fmt.codes(w, p, split)
        if not fmt.stores(shape):  # SDNQ cannot pack this size in this dtype: the layer stays FP, priced FP
            info = LayerInfo("model.x", "linear" if len(shape) == 2 else "conv", tuple(shape), tuple(split), False, 1)
            assert torch.equal(fq, w) and CostModel(2, 2).weight_bytes(info, fmt.key) == math.prod(shape) * 2
            return
        assert fmt.stored_bytes(shape, split, 4) == fmt.stored_bytes(shape, split, 2) > math.prod(shape) / 8
        assert not torch.equal(fq, w)
        return
    assert {k: (tuple(t.shape), t.dtype) for k, t in p.items()} == {
        k: (tuple(s), d) for k, (s, d) in fmt.param_shapes(shape, split).items()
    }
    codes = fmt.codes(w, p, split)
    packed = fmt.pack(codes)
    numel = math.prod(shape)
    assert packed.dtype == torch.uint8 and packed.numel() == fmt.packed_bytes(numel)
    unpacked = fmt.unpack(packed, numel).reshape(shape)
    assert torch.equal(unpacked.long(), codes.long())  # bit-exact round trip
    fq = fmt.fake_quant(w, p, split)
    assert fq.dtype == w.dtype and torch.equal(fmt.decode(unpacked, p, shape, split).to(w.dtype), fq)
    exported = fmt.export_params(p)  # what an export stores, and what a loader gets back
    assert fmt.export_shapes(shape, split) == {k: (tuple(t.shape), t.dtype) for k, t in exported.items()}
    assert torch.equal(fmt.decode(unpacked, fmt.import_params(exported), shape, split).to(w.dtype), fq)
    assert fmt.param_bytes(shape, split, 4) == _nbytes(exported)  # priced (fp32 parameters) == stored
    assert fmt.stored_bytes(shape, split, 4) == packed.numel() + _nbytes(exported)
    assert (fq - w).abs().max() < w.abs().max()  # it quantizes, not scrambles


def test_a_layer_keeps_every_candidate_in_its_bank():
    """The checkpoint's widths stack one row each in ``w_scale`` / ``w_offset`` (the checkpoint's layout), every
    ``nf<k>`` shares one bank, every other format has its own; each decodes as its format computes it alone."""
    conv = nn.Conv2d(10, 12, 3)
    q = QuantConv2d.from_float(conv)
    wq = WeightQuant("asymmetric", "group", 4)
    q.init_quant([2, 4, 8], in_split=(0, 4, 10), wq=wq, formats=NAMED)
    q.calibrate_weight()
    state = q.quant_state()
    assert state["w_scale"].shape[0] == 3 and state["w_offset"].shape == state["w_scale"].shape
    assert [k for k in state if k.startswith("wf_nf_")] == ["wf_nf_ratio", "wf_nf_smax"]
    for key in q.weight_keys:
        fmt = resolve(key, wq)
        alone = fmt.fake_quant(conv.weight, fmt.calibrate(conv.weight, (0, 4, 10)), (0, 4, 10))
        assert torch.equal(q.weight_at(key), alone), key
    with pytest.raises(ValueError, match="mixes stacked and shared"):
        layout([resolve(4), _SharedWidth()], (4, 4), (0, 4))


@dataclass(frozen=True)
class _SharedWidth(CheckpointInt):  # a width in the checkpoint's bank that would not take its own row
    bits: int = 4
    wq: WeightQuant = WeightQuant()
    stacked = False


# ----------------------------------------------------------------------------- a new format is one class
@dataclass(frozen=True)
class ToySign(Format):
    """A 1-bit format: the sign of each weight, times its output channel's mean absolute value."""

    choices = "toysign"

    @classmethod
    def from_name(cls, name: str) -> ToySign | None:
        return cls() if name == "toysign" else None

    @property
    def name(self) -> str:
        return "toysign"

    @property
    def nominal_bits(self) -> float:
        return 1.0

    @property
    def bank(self) -> str:
        return "wf_toysign_"

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        return {"scale": ((int(shape[0]),), torch.float32)}

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        return {"scale": w.detach().float().reshape(w.shape[0], -1).abs().mean(dim=1)}

    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        return (w.detach() >= 0).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        sign = codes.reshape(tuple(shape)).float() * 2 - 1
        return sign * p["scale"].float().reshape((-1,) + (1,) * (len(shape) - 1)).to(sign.device)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        bits = codes.reshape(-1).to(torch.uint8)
        bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).reshape(-1, 8)
        return (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        return ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel]

    def packed_bytes(self, numel: int) -> int:
        return -(-numel // 8)

    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        return float(int(shape[0]) * scale_bytes)


@pytest.fixture
def toysign():
    register(ToySign)
    yield ToySign()
    unregister(ToySign)
    with pytest.raises(MpqError, match="unknown weight format"):
        parse_format("toysign")


def test_a_new_format_is_one_class(toysign, tmp_path):
    """Registered, the toy runs through names, plans and their files, the cost model, fake quant, the packed
    export (bytes priced == bytes stored, decoded == fake-quantized), torchao and the encodings, unchanged."""
    assert resolve("TOYSIGN") == toysign and weight_key(" toysign ") == "toysign"
    with pytest.raises(MpqError, match="toysign"):
        parse_format("toy")  # the one-line error lists it among the choices
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Conv2d(16, 8, 3), nn.Linear(5, 7))
    qm = QuantModel(model)
    qm.prepare([4, 8], False, formats=["toysign", "nf12"])
    for layer in qm.layers.values():
        layer.calibrate_weight()
    names = qm.names
    plan = BitPlan({names[0]: "toysign", names[1]: "toysign", names[2]: 4}, {names[2]: 8}).validate(
        names, qm.bits, formats=qm.formats
    )
    assert plan.formats == ["toysign"]
    written = write_plan(tmp_path / "weight.yaml", plan.weight)
    assert written.name == "weight.formats.yaml" and read_plan(written) == plan.weight  # never a MixDQ file
    infos = describe(qm, [], warn=False)
    cost = CostModel(4, 4)
    layer = qm.layers[names[0]]
    assert cost.weight_bytes(infos[0], "toysign") == 16 * 24 / 8 + 16 * 4
    assert average_bits([(16 * 24, "toysign"), (16 * 24, 4)]) == 2.5
    p = layer.format_params(toysign)
    assert torch.equal(layer.weight_at("toysign"), toysign.fake_quant(layer.weight, p, layer.in_split))
    tensors, qconfig = denoiser_export(qm, plan, torch.float32)
    paths = [n[len(PREFIX) :] for n in names]
    assert weight_bytes_of(tensors, paths) == cost.plan_cost(plan, infos).weight_bytes
    path = names[0][len(PREFIX) :]
    spec = PackedSpec.from_dict(qconfig["layers"][path])
    assert spec.w_bits == "toysign" and set(tensors) >= {f"{path}.qweight", f"{path}.wf_scale"}
    with torch.device("meta"):
        packed = PackedLayer(spec)
    packed.load_state_dict({k[len(path) + 1 :]: t for k, t in tensors.items() if k.startswith(path + ".")}, assign=True)
    assert torch.equal(packed.dequantized_weight(torch.float32), layer.weight_at("toysign"))
    with pytest.raises(MpqError, match="holds integer weight scales"):
        plan_encodings(qm, plan)
    tq = pytest.importorskip("torchao.quantization")
    if not hasattr(tq, "FqnToConfig"):
        pytest.skip("needs torchao's FqnToConfig")
    from mpq.export.torchao_format import torchao_plan

    rows = {r["layer"]: r for r in torchao_plan(qm, plan)[1]}
    assert rows[names[0]]["torchao"] == "FP" and "toysign kept FP" in rows[names[0]]["note"]
    assert rows[names[2]]["torchao"].startswith("IntxWeightOnlyConfig(int4")


def test_named_integer_formats_map_to_torchao_and_encodings_like_the_checkpoints():
    """Capabilities, not names: a symmetric per-channel integer format is what AIMET's encodings hold, as the
    checkpoint's MixDQ widths are; an asymmetric one is refused with its own remedy."""
    torch.manual_seed(1)
    qm = QuantModel(nn.Sequential(nn.Linear(24, 16), nn.Linear(16, 8)))
    qm.prepare([4, 8], False, formats=["int4-sym-channel", "int4-asym-g8"])
    for layer in qm.layers.values():
        layer.calibrate_weight()
    a, b = qm.names
    enc = plan_encodings(qm, BitPlan({a: "int4-sym-channel", b: 4}))["param_encodings"]
    width = plan_encodings(qm, BitPlan({a: 4}))["param_encodings"]
    assert set(enc) == {f"{n[len(PREFIX) :]}.weight" for n in (a, b)}
    assert enc[f"{a[len(PREFIX) :]}.weight"] == width[f"{a[len(PREFIX) :]}.weight"]  # the checkpoint's MixDQ maths
    with pytest.raises(MpqError, match="plan int4-sym-channel"):
        plan_encodings(qm, BitPlan({a: "int4-asym-g8"}))
