"""Where a quantized layer keeps its weight candidates' parameters (pure layout arithmetic).

Every :class:`~mpq.quant.formats.base.Format` names a *bank*: the prefix of the buffers ``<bank><param>`` that hold
its parameters. Formats with one bank share its buffers: one set, calibrated once (every ``nf<k>``: ``wf_nf_ratio``
/ ``wf_nf_smax``), or, in a ``stacked`` bank, one row each in the layer's order (the checkpoint's integer widths:
``w_scale`` / ``w_offset``, (widths, rows, groups)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpq.quant.formats import Format, Key, ParamShapes


@dataclass(frozen=True)
class Slot:
    """Where one format's parameters live: the buffers ``bank + param`` (row ``row`` of each in a stacked bank)."""

    bank: str
    params: tuple[str, ...]
    row: int | None = None

    def view(self, buffers: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The format's parameters in ``buffers`` (a module's ``_buffers``)."""
        out: dict[str, torch.Tensor] = {}
        for p in self.params:
            t = buffers[self.bank + p]
            assert t is not None, f"buffer {self.bank + p} was removed"
            out[p] = t if self.row is None else t[self.row]
        return out


def layout(
    formats: Sequence[Format], shape: Sequence[int], in_split: Sequence[int]
) -> tuple[ParamShapes, dict[Key, Slot]]:
    """(the buffers to allocate: {name: (shape, dtype)}, each format's slot by its key) for a weight of ``shape``."""
    banks: dict[str, list[Format]] = {}
    for fmt in formats:
        banks.setdefault(fmt.bank, []).append(fmt)
    buffers: ParamShapes = {}
    slots: dict[Key, Slot] = {}
    for bank, members in banks.items():
        stacked = members[0].stacked
        if any(f.stacked != stacked for f in members):
            raise ValueError(f"bank {bank!r} mixes stacked and shared formats: {[f.name for f in members]}")
        shapes = members[0].param_shapes(shape, in_split)
        for param, (pshape, dtype) in shapes.items():
            buffers[bank + param] = ((len(members), *pshape) if stacked else pshape, dtype)
        for row, fmt in enumerate(members):
            slots[fmt.key] = Slot(bank, tuple(shapes), row if stacked else None)
    return buffers, slots


def calibrators(formats: Sequence[Format]) -> list[Format]:
    """The formats whose :meth:`~Format.calibrate` fills every bank: each member of a stacked bank, the first of a
    shared one (its members' parameters are the same)."""
    seen: set[str] = set()
    out = []
    for fmt in formats:
        if fmt.stacked or fmt.bank not in seen:
            out.append(fmt)
        seen.add(fmt.bank)
    return out
