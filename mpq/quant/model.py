"""QuantModel: wraps the denoiser's Linear/Conv2d layers, lists them, applies plans.

Layers are discovered by module type (never by SDXL names); a layer's name
is ``model.`` + its module path, as in the MixDQ files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mpq.plan import BitPlan
from mpq.quant.formats import Key
from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mpq.quant.quantizer import WeightQuant
from mpq.quant.steps import attach
from mpq.quant.structure import PREFIX, Structure, quantizable_modules

__all__ = ["PREFIX", "QuantModel", "fingerprint", "quantizable_modules", "same_weights", "weights_sample"]


def fingerprint(denoiser: nn.Module) -> str:
    """A hash of every quantizable layer's name and weight shape: identifies the architecture."""
    h = hashlib.sha256()
    for name, m in quantizable_modules(denoiser).items():
        h.update(f"{name}:{tuple(m.weight.shape)};".encode())
    return h.hexdigest()[:16]


def weights_sample(denoiser: nn.Module, per_layer: int = 4) -> list[float]:
    """A few weight values of every quantizable layer (evenly strided, as fp32): tells two sets of weights of the
    same architecture apart (another checkpoint, a fine-tune), while the model dtype's rounding does not."""
    out: list[float] = []
    for m in quantizable_modules(denoiser).values():
        w = m.weight.detach().reshape(-1)
        step = max(1, w.numel() // per_layer)
        out += [float(v) for v in w[::step][:per_layer].float().cpu()]
    return out


def same_weights(a: Sequence[float] | None, b: Sequence[float], rtol: float = 1e-2) -> bool:
    """Whether two :func:`weights_sample` s come from the same weights (fp16/bf16 copies included); ``a`` None (a
    record written before samples were kept) cannot tell, and passes."""
    if a is None:
        return True
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return bool(torch.all((ta - tb).abs() <= rtol * tb.abs().clamp_min(1e-3)))


class QuantModel:
    """The denoiser with every Linear/Conv2d replaced by its quantized twin (in place).

    The quant params live in each layer's buffers, so the denoiser itself is the
    quantized model (``.to()``, ``state_dict()`` and hooks see them); this class
    lists the layers and switches their bits with :meth:`apply` (a :class:`~mpq.plan.BitPlan`).
    """

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.fingerprint = fingerprint(denoiser)
        self.layers: dict[str, QuantLayer] = {}
        for name, module in quantizable_modules(denoiser).items():
            q = module if isinstance(module, QuantLayer) else self._wrap(module)
            self.layers[name] = q
            if q is not module:
                parent_path, _, child = name[len(PREFIX) :].rpartition(".")
                parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
                setattr(parent, child, q)

    @staticmethod
    def _wrap(module: nn.Module) -> QuantLayer:
        return QuantLinear.from_float(module) if isinstance(module, nn.Linear) else QuantConv2d.from_float(module)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def bits(self) -> list[int]:
        return next(iter(self.layers.values())).bits if self.layers else []

    def prepare(
        self,
        bits: Sequence[int],
        a_symmetric: bool,
        structure: Structure | None = None,
        wq: WeightQuant | None = None,
        formats: Sequence[str] = (),
        step_bounds: Sequence[float] = (),
    ) -> None:
        """Allocate every layer's quant buffers for ``bits``, the weight quantizer ``wq`` (default: MixDQ's) and
        the other weight ``formats`` (:mod:`mpq.quant.formats`), with the input splits, BOS-aware layers and input
        sizes of ``structure`` (:func:`mpq.quant.structure.trace`); ``step_bounds`` (ascending timesteps): activation
        ranges per group of sampling steps besides the all-steps one (:mod:`mpq.quant.steps`)."""
        st = structure or Structure()
        for name, layer in self.layers.items():
            layer.init_quant(
                bits,
                st.in_split.get(name),
                name in st.bos,
                a_symmetric,
                st.act_numel.get(name, 0),
                wq,
                formats,
                step_bounds,
            )
        if step_bounds:
            attach(self.denoiser)

    @property
    def step_groups(self) -> int:
        """Activation ranges per group of sampling steps (1: one range for all steps)."""
        return next(iter(self.layers.values())).step_groups if self.layers else 1

    @property
    def formats(self) -> list[str]:
        """The weight formats calibrated besides the integer bits."""
        return list(next(iter(self.layers.values())).formats) if self.layers else []

    @property
    def weight_keys(self) -> list[Key]:
        """Every weight candidate: the integer bits, then the formats."""
        return [*self.bits, *self.formats]

    @property
    def weight_quant(self) -> WeightQuant:
        return next(iter(self.layers.values())).wq if self.layers else WeightQuant()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)

    # ------------------------------------------------------------------ bits
    def set_fp(self) -> None:
        for layer in self.layers.values():
            layer.set_bits(None, None)

    def apply(self, plan: BitPlan) -> None:
        """Apply ``plan`` (validated against the layers and calibrated bits); a layer it does not quantize stays FP."""
        plan.validate(self.names, self.bits, formats=self.formats)
        for name, layer in self.layers.items():
            layer.set_bits(plan.weight.get(name), plan.act.get(name))

    @contextmanager
    def observing(self, momentum: float, repeats: int = 1, quant_bits: int | None = None) -> Iterator[None]:
        """Record input ranges while in the block (``repeats`` updates a call; with ``quant_bits``, W and A are
        quantized at those bits with the ranges so far, as MixDQ's calibration does)."""
        for layer in self.layers.values():
            layer.observing, layer.momentum, layer.observe_repeats, layer.observe_bits = (
                True,
                momentum,
                repeats,
                quant_bits,
            )
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.observing, layer.observe_repeats, layer.observe_bits = False, 1, None

    # ------------------------------------------------------------------ checkpoint
    def quant_state(self) -> dict[str, torch.Tensor]:
        return {f"{name}::{key}": t for name, layer in self.layers.items() for key, t in layer.quant_state().items()}

    def load_quant_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors into the prepared buffers (shapes must match)."""
        for key, t in tensors.items():
            name, _, buf = key.partition("::")
            layer = self.layers[name]
            getattr(layer, buf).copy_(t)
            if buf == "a_range":
                layer.a_observed = True
            if buf == "a_step_range":
                layer.a_step_observed = set(range(layer.step_groups))
            if buf == "a_step_bounds":
                layer._bounds = None  # re-read by step_bounds()
            layer._wcache = {}
