"""QuantModel: wraps the denoiser's Linear/Conv2d layers, lists them, applies plans.

Layers are discovered by module type (never by SDXL names); a layer's name
is ``model.`` + its module path, as in the MixDQ files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpq.groups import assign_groups
from mpq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from mpq.quant.structure import PREFIX, Structure, example_inputs, quantizable_modules

__all__ = ["PREFIX", "LayerInfo", "QuantModel", "example_inputs", "fingerprint", "layer_infos", "quantizable_modules"]


@dataclass(frozen=True)
class LayerInfo:
    """What the search needs to know about one quantizable layer."""

    name: str
    kind: str  # linear | conv
    group: str  # content | quality
    weight_numel: int  # bias excluded
    act_numel: int  # input activation elements for one sample at the config's resolution
    out_channels: int
    n_parts: int = 1  # input parts with their own quantizers (a split concatenated input: 2)
    bos_numel: int = 0  # input elements per sample kept FP (the BOS token of a BOS-aware layer)

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def layer_infos(denoiser: nn.Module, structure: Structure, content_patterns: list[str]) -> list[LayerInfo]:
    """One :class:`LayerInfo` per quantizable layer; ``structure`` as the quantizer will use it
    (splits and BOS layers present only where enabled)."""
    modules = quantizable_modules(denoiser)
    groups = assign_groups(modules, content_patterns)
    return [
        LayerInfo(name=name, kind="linear" if isinstance(m, nn.Linear) else "conv", group=groups[name], weight_numel=m.weight.numel(),
                  act_numel=int(structure.act_numel.get(name, 0)), out_channels=m.weight.shape[0],
                  n_parts=len(structure.in_split.get(name, (0, 0))) - 1, bos_numel=m.weight.shape[1] if name in structure.bos else 0)
        for name, m in modules.items()
    ]


def fingerprint(denoiser: nn.Module) -> str:
    """A hash of every quantizable layer's name and weight shape: identifies the architecture."""
    h = hashlib.sha256()
    for name, m in quantizable_modules(denoiser).items():
        h.update(f"{name}:{tuple(m.weight.shape)};".encode())
    return h.hexdigest()[:16]


class QuantModel:
    """The denoiser with every Linear/Conv2d replaced by its quantized twin (in place).

    The quant params live in each layer's buffers, so the denoiser itself is the
    quantized model (``.to()``, ``state_dict()`` and hooks see them); this class
    lists the layers and switches their bits.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.fingerprint = fingerprint(denoiser)
        self.layers: dict[str, QuantLayer] = {}
        for name, module in quantizable_modules(denoiser).items():
            q = module if isinstance(module, QuantLayer) else self._wrap(module)
            self.layers[name] = q
            if q is not module:
                parent_path, _, child = name[len(PREFIX):].rpartition(".")
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

    def prepare(self, bits: Sequence[int], a_symmetric: bool, in_split: Mapping[str, Sequence[int]] | None = None,
                bos: Iterable[str] = ()) -> None:
        """Allocate every layer's quant buffers for ``bits`` (``in_split``: split inputs; ``bos``: BOS-aware layers)."""
        in_split, bos = in_split or {}, set(bos)
        for name, layer in self.layers.items():
            layer.init_quant(bits, in_split.get(name), name in bos, a_symmetric)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.denoiser(*args, **kwargs)

    # ------------------------------------------------------------------ bits
    def set_uniform(self, w_bits: int | None, a_bits: int | None) -> None:
        for layer in self.layers.values():
            layer.set_bits(w_bits, a_bits)

    def set_fp(self) -> None:
        self.set_uniform(None, None)

    def apply(self, weight_bits: Mapping[str, int] | None, act_bits: Mapping[str, int] | None) -> None:
        """Apply per-layer bits; a layer absent from a mapping stays floating point there."""
        weight_bits = weight_bits or {}
        act_bits = act_bits or {}
        for name, layer in self.layers.items():
            layer.set_bits(weight_bits.get(name), act_bits.get(name))

    @contextmanager
    def observing(self, momentum: float, repeats: int = 1, quant_bits: int | None = None) -> Iterator[None]:
        """Record input ranges while in the block (``repeats`` updates a call; with ``quant_bits``, W and A are
        quantized at those bits with the ranges so far, as MixDQ's calibration does)."""
        for layer in self.layers.values():
            layer.observing, layer.momentum, layer.observe_repeats, layer.observe_bits = True, momentum, repeats, quant_bits
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
            layer._wcache = {}
