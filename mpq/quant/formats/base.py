"""The weight-format interface: every weight candidate is a :class:`Format` (pure functions on tensors).

A format is one class: its name, the bytes it stores for a layer shape, its parameters (``calibrate``), its codes
(``codes``) and their decoding (``decode``: the one formula fake quant and the packed export share), the packing of
its codes (``pack`` / ``unpack``, ``packed_bytes``), the names its parameters take in an export
(``export_params``), and capability flags that consumers ask instead of checking types or names:

* ``grid``: the uniform integer grid it is, if any (:class:`IntGrid`): what torchao's ``IntxWeightOnlyConfig`` and
  AIMET's encodings can hold;
* ``torchao_w8a8``: with 8-bit activations on a Linear, torchao's dynamic W8A8 config stands for it;
* ``config_key``: the config key that calibrates it (``quant.bits`` or ``quant.weight_formats``);
* ``runtime``: what stores it: ``mpq`` (its packed export, ``codes`` / ``pack`` / ``decode``), or a runtime whose
  own format it is (``sdnq``, ``gguf``), exported in that runtime's layout; ``packs``: the first;
* ``fp_bos_row``: a cross-attention ``to_k`` / ``to_v`` layer computes the constant first text token (BOS) with
  its FP weight (PTQ's rule; mpq's export stores that row); False for a runtime's format, which runs every token
  through its quantized weight, so the simulation must too;
* ``data_free``: it has no parameters to calibrate (its quantizer reads the weight alone), so a plan may name it
  whether or not the checkpoint lists it.

In a quantized layer its parameters are buffers ``<bank><param>``: formats with one ``bank`` share those buffers
(every ``nf<k>`` one set of block scales), or, ``stacked``, hold one row each (the checkpoint's integer widths:
``w_scale`` / ``w_offset`` (widths, rows, groups)). A key (``4``, ``"nf12"``) resolves to its format in one place:
:func:`mpq.quant.formats.registry.resolve`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpq.errors import MpqError
from mpq.quant.quantizer import WeightQuant

Key = int | str  # a weight candidate as plans hold it: the checkpoint's integer width, or a format's name
Params = dict[str, torch.Tensor]
ParamShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

BITS_KEY = "quant.bits"  # calibrates the checkpoint's integer quantizer (``quant.weight``) at each width
FORMATS_KEY = "quant.weight_formats"  # calibrates the named formats
EXPORT_PREFIX = "wf_"  # a format's parameters in an export: ``<layer>.wf_<param>``


@dataclass(frozen=True)
class IntGrid:
    """A uniform integer grid ``bits`` wide whose parameters are ``scale`` (and, asymmetric, ``offset``) per row and
    group of ``wq`` (:class:`~mpq.quant.quantizer.WeightQuant`): what torchao's and AIMET's integer configs hold.
    ``remedy``: how to plan it with symmetric per-channel scales instead (for exports that hold only those)."""

    bits: int
    wq: WeightQuant
    remedy: str

    @property
    def symmetric_channel(self) -> bool:
        """Symmetric levels, one scale per output channel (and input part) or per tensor: AIMET's weight encodings."""
        return not self.wq.asymmetric and self.wq.granularity in ("channel", "tensor")


class Format(ABC):
    """A weight format: see the module docstring. Subclasses implement the abstract methods and properties; a
    format that is not a uniform integer grid needs nothing else."""

    choices: ClassVar[str] = ""  # how the names it answers to read (the registry's one-line error lists them)
    stacked: bool = False  # its bank holds one row per member format (in the layer's order), not one shared set
    config_key: str = FORMATS_KEY  # the config key that calibrates it
    runtime: ClassVar[str] = "mpq"  # what stores it: mpq's packed export, or a runtime's own file (see the module)
    data_free: bool = False  # nothing to calibrate: usable in a plan without a checkpoint entry (SDNQ's dtypes)
    fp_bos_row: bool = True  # a constant first text token keeps its FP row (mpq's export stores it; see the module)

    @property
    def packs(self) -> bool:
        """mpq's packed export stores it."""
        return self.runtime == "mpq"

    # -------------------------------------------------------------- identity
    @classmethod
    def from_name(cls, name: str) -> Format | None:
        """The format a (lower-case, stripped) name stands for; None when the name is not one of this class's (an
        :class:`~mpq.errors.MpqError` when it is, with a parameter out of range)."""
        return None

    @property
    @abstractmethod
    def name(self) -> str:
        """Its canonical name: what plans hold (``weight_key(name) == key``)."""

    @property
    def key(self) -> Key:
        """The weight candidate as plans hold it: the name (the checkpoint's integer quantizer: its width)."""
        return self.name

    @property
    @abstractmethod
    def nominal_bits(self) -> float:
        """The code bits a weight (what average bits count; parameters are priced in bytes)."""

    @property
    @abstractmethod
    def bank(self) -> str:
        """The prefix of its parameter buffers in a quantized layer (``wf_<slug>_``)."""

    @property
    def grid(self) -> IntGrid | None:
        """The uniform integer grid it is (None: another kind of code, which integer-only exports cannot hold)."""
        return None

    @property
    def torchao_w8a8(self) -> bool:
        """With 8-bit activations on a Linear, torchao's dynamic W8A8 config (``Int8DynamicActivationInt8WeightConfig``:
        int8 weights per channel, activations per token) stands for it."""
        return False

    # -------------------------------------------------------------- parameters and codes
    @abstractmethod
    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        """{param: (shape, dtype)} of what :meth:`calibrate` returns for a weight of ``shape``."""

    @abstractmethod
    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        """Its parameters for weight ``w`` (input parts ``in_split``)."""

    @abstractmethod
    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        """``w``'s codes (``w``'s shape), as :meth:`pack` takes them."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        """Codes back to the weight (float32 or the parameters' dtype): the formula fake quant and export share."""

    def fake_quant(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        """``w`` quantized and decoded, in ``w``'s dtype."""
        return self.decode(self.codes(w, p, in_split), p, tuple(w.shape), in_split).to(w.dtype)

    # -------------------------------------------------------------- storage
    @abstractmethod
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> flat uint8 (exactly :meth:`packed_bytes` of them)."""

    @abstractmethod
    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        """Flat uint8 from :meth:`pack` -> the first ``numel`` codes (flat)."""

    @abstractmethod
    def packed_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` packed codes."""

    @abstractmethod
    def param_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int) -> float:
        """Bytes of the stored parameters (``scale_bytes`` a float scale or offset: the cost model's choice)."""

    def stores(self, shape: Sequence[int]) -> bool:
        """Whether it can store a weight of ``shape``; where a runtime's format cannot (SDNQ packs some widths in
        whole words), the layer stays FP in that candidate: the fake quant returns the weight, the cost model prices
        FP and the export leaves the layer unconverted."""
        return True

    def stored_bytes(self, shape: Sequence[int], in_split: Sequence[int], scale_bytes: int = 2) -> float:
        """Bytes of a weight of ``shape`` in this format: packed codes and parameters (what the cost model prices)."""
        return float(self.packed_bytes(math.prod(shape)) + self.param_bytes(shape, in_split, scale_bytes))

    # -------------------------------------------------------------- export
    def export_params(self, p: Params) -> Params:
        """The parameters as an export stores them: ``<export_prefix><param>``, floating ones as float32."""
        return {self.export_prefix + k: stored_copy(t) for k, t in p.items()}

    def import_params(self, stored: Mapping[str, torch.Tensor]) -> Params:
        """:meth:`export_params`' tensors back to parameters (the inverse naming)."""
        prefix = self.export_prefix
        return {k[len(prefix) :]: t for k, t in stored.items() if k.startswith(prefix)}

    @property
    def export_prefix(self) -> str:
        """The prefix of its parameters' names in an export."""
        return EXPORT_PREFIX

    def export_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        """{name: (shape, dtype)} of :meth:`export_params` for a weight of ``shape`` (what a loader allocates)."""
        meta = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self.param_shapes(shape, in_split).items()}
        return {k: (tuple(t.shape), t.dtype) for k, t in self.export_params(meta).items()}


class RuntimeFormat(Format):
    """A runtime's own format (SDNQ's dtypes, ggml's types): quantized from the weight alone by that runtime's
    package (:meth:`decoded`), stored by that runtime, not by mpq's packed export. Data-free, no FP BOS row; where
    the runtime cannot store a weight (:meth:`Format.stores`) the layer stays FP in the candidate."""

    data_free = True
    fp_bos_row = False
    not_packed: ClassVar[str] = "{name}: mpq's packed export does not hold it"  # the one-line refusal

    @abstractmethod
    def decoded(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` quantized and dequantized by the runtime's package (a weight it stores), in ``w``'s dtype."""

    def param_shapes(self, shape: Sequence[int], in_split: Sequence[int]) -> ParamShapes:
        return {}

    def calibrate(self, w: torch.Tensor, in_split: Sequence[int]) -> Params:
        return {}

    def fake_quant(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        if not self.stores(w.shape):
            return w.detach().clone()  # the layer stays FP in this candidate (see :meth:`stores`)
        return self.decoded(w)

    # mpq's packing: not this format's
    def codes(self, w: torch.Tensor, p: Params, in_split: Sequence[int]) -> torch.Tensor:
        raise self._not_packed()

    def decode(self, codes: torch.Tensor, p: Params, shape: Sequence[int], in_split: Sequence[int]) -> torch.Tensor:
        raise self._not_packed()

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        raise self._not_packed()

    def unpack(self, packed: torch.Tensor, numel: int) -> torch.Tensor:
        raise self._not_packed()

    def packed_bytes(self, numel: int) -> int:
        raise self._not_packed()

    def _not_packed(self) -> MpqError:
        return MpqError(self.not_packed.format(name=self.name))


def stored_copy(t: torch.Tensor) -> torch.Tensor:
    """A parameter as exports keep it: a detached copy, float32 when floating (exact dequantization in any dtype)."""
    return t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
