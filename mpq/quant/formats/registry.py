"""The one place a weight key becomes a :class:`~mpq.quant.formats.base.Format`.

A key is the checkpoint's integer width (``4``: :class:`~mpq.quant.formats.integer.CheckpointInt` with the run's
weight quantizer) or a format's name (``"nf12"``, ``"fp8"``, ``"int4-asym-g64"``), which the registered classes
answer in order (:func:`register`, a class decorator). A name none takes is a one-line :class:`~mpq.errors.MpqError`
naming the choices.
"""

from __future__ import annotations

from functools import cache
from typing import TypeVar

from mpq.errors import MpqError
from mpq.quant.formats.base import Format, Key
from mpq.quant.formats.integer import CheckpointInt
from mpq.quant.quantizer import WeightQuant

F = TypeVar("F", bound=type[Format])

_CLASSES: list[type[Format]] = []
WIDTHS = "integer bits 2..8"  # the checkpoint's integer quantizer, in the list of choices


def register(cls: F) -> F:
    """Register a format class (its ``from_name`` answers the names it takes; its ``choices`` join the list of
    choices); returns it, so it decorates the class."""
    if cls not in _CLASSES:
        _CLASSES.append(cls)
    parse_format.cache_clear()
    return cls


def unregister(cls: type[Format]) -> None:
    """Take a registered class out again (a test's own format)."""
    if cls in _CLASSES:
        _CLASSES.remove(cls)
    parse_format.cache_clear()


def registered() -> tuple[type[Format], ...]:
    """The registered format classes, in the order names are tried."""
    return tuple(_CLASSES)


def known_formats() -> str:
    """The choices, for one-line errors: ``integer bits 2..8, nf7|nf12|..., fp8, int<b>-...``."""
    return ", ".join([WIDTHS, *(c.choices for c in _CLASSES)])


@cache
def parse_format(name: str) -> Format:
    """The format a name stands for; an unknown name or a bad parameter is a one-line error naming the choices."""
    text = str(name).strip().lower()
    for cls in _CLASSES:
        try:
            fmt = cls.from_name(text)
        except MpqError as err:
            raise MpqError(f"weight format {name!r}: {err}; choose one of {known_formats()}") from None
        if fmt is not None:
            return fmt
    raise MpqError(f"unknown weight format {name!r}; choose one of {known_formats()}")


def weight_key(value: object) -> Key:
    """A weight candidate as plans hold it: an int (the checkpoint's integer quantizer at that width) or a format's
    canonical name."""
    if isinstance(value, bool):
        raise MpqError(f"weight format {value!r}: give bits (2..8) or a format name ({known_formats()})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    return parse_format(text).name


@cache
def _width(bits: int, wq: WeightQuant) -> CheckpointInt:
    return CheckpointInt(bits, wq)


def resolve(key: object, wq: WeightQuant | None = None) -> Format:
    """The format of a weight key: a width is the checkpoint's integer quantizer ``wq`` (default: MixDQ's, symmetric
    per channel) at that width, a name the format it names."""
    k = weight_key(key)
    return _width(k, wq or WeightQuant()) if isinstance(k, int) else parse_format(k)


def nominal_bits(key: Key) -> float:
    """The code bits a weight of ``key`` (what average bits count): the width of an int, log2(k) of ``nf<k>``."""
    return resolve(key).nominal_bits
