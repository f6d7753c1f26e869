"""Weight formats: every weight candidate is a :class:`Format` (:mod:`~mpq.quant.formats.base`), and
:func:`resolve` (:mod:`~mpq.quant.formats.registry`) turns a key into one.

A weight candidate is a *key*: an ``int`` is the checkpoint's integer quantizer (``quant.weight``) at that width,
exactly as MixDQ's files mean it (:class:`CheckpointInt`); a ``str`` names a registered format
(``quant.weight_formats``):

* ``nf<k>``, k in 7, 12, 16, 24, 32: a NormalFloat codebook of k levels (:mod:`~mpq.quant.formats.nf`);
* ``fp8``: float8 e4m3 codes with an fp32 scale per output channel (:mod:`~mpq.quant.formats.fp8`);
* ``int<b>-<sym|asym>-<tensor|channel|kernel|g<N>>``: the integer grid with its own level set and scale
  granularity (:class:`IntFormat`), beside the checkpoint's;
* ``sdnq-<dtype>[-row|-g<N>]``: a weight dtype of SDNQ, quantized by the ``sdnq`` package itself
  (:mod:`~mpq.quant.formats.sdnq`; data-free, exported with ``mpq export --format sdnq``);
* ``gguf-<type>``: a ggml tensor type as GGUF files store it, quantized by the ``gguf`` package
  (:mod:`~mpq.quant.formats.gguf`; data-free).

A new weight-only format is one class: subclass :class:`Format` (its module beside these) and :func:`register` it
below (``register`` is also a class decorator: a format defined elsewhere registers itself); nothing else changes
(``tests/test_format_interface.py`` runs a toy format through every consumer).
"""

from mpq.quant.formats.base import BITS_KEY, FORMATS_KEY, Format, IntGrid, Key, Params, ParamShapes
from mpq.quant.formats.basek import base_word, pack_base, packed_base_bytes, unpack_base
from mpq.quant.formats.fp8 import FP8_MAX, FP8Format
from mpq.quant.formats.gguf import GgufFormat
from mpq.quant.formats.integer import CheckpointInt, IntFormat
from mpq.quant.formats.nf import NF_BLOCK, NF_LEVELS, NF_SUPER_BLOCKS, NFFormat, nf_levels
from mpq.quant.formats.registry import (
    known_formats,
    nominal_bits,
    parse_format,
    register,
    registered,
    resolve,
    unregister,
    weight_key,
)
from mpq.quant.formats.sdnq import SdnqFormat

for _cls in (
    NFFormat,
    FP8Format,
    IntFormat,
    SdnqFormat,
    GgufFormat,
):  # the built-in families, in the order names are tried
    register(_cls)

__all__ = [
    "BITS_KEY",
    "FORMATS_KEY",
    "FP8_MAX",
    "NF_BLOCK",
    "NF_LEVELS",
    "NF_SUPER_BLOCKS",
    "CheckpointInt",
    "FP8Format",
    "GgufFormat",
    "Format",
    "IntFormat",
    "IntGrid",
    "Key",
    "NFFormat",
    "ParamShapes",
    "SdnqFormat",
    "Params",
    "base_word",
    "known_formats",
    "nf_levels",
    "nominal_bits",
    "pack_base",
    "packed_base_bytes",
    "parse_format",
    "register",
    "registered",
    "resolve",
    "unpack_base",
    "unregister",
    "weight_key",
]
