"""Denoiser families: one adapter file each (:mod:`.unet`, :mod:`.pixart`, :mod:`.sd3`, :mod:`.flux`).

:func:`family_of` finds the adapter of a denoiser, a pipeline or a class name;
a denoiser class without one is a one-line error naming it and the supported
families. A new family is one new file and one line in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mpq.errors import MpqError
from mpq.families.base import Family
from mpq.families.flux import FluxFamily
from mpq.families.pixart import PixArtFamily
from mpq.families.sd3 import SD3Family
from mpq.families.unet import UNetFamily

FAMILIES: dict[str, Family] = {f.denoiser_class: f for f in (UNetFamily(), PixArtFamily(), SD3Family(), FluxFamily())}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}
COMPONENTS = tuple(dict.fromkeys(f.component for f in FAMILIES.values()))  # unet, transformer


def supported() -> str:
    return "; ".join(f.describe() for f in FAMILIES.values())


def family_of(obj: Any) -> Family:
    """The adapter of a denoiser module, a pipeline (its denoiser), a class name, or a family's short name."""
    if isinstance(obj, str):
        cls_name = obj
    else:
        if not isinstance(obj, nn.Module):
            obj = next((getattr(obj, c) for c in COMPONENTS if isinstance(getattr(obj, c, None), nn.Module)), obj)
        cls_name = type(obj).__name__
    if cls_name in FAMILIES:
        return FAMILIES[cls_name]
    if cls_name in BY_NAME:
        return BY_NAME[cls_name]
    raise MpqError(f"mpq has no adapter for the denoiser class {cls_name}; supported: {supported()}")


__all__ = ["BY_NAME", "COMPONENTS", "FAMILIES", "Family", "family_of", "supported"]
