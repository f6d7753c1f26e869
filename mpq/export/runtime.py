"""What the exports for other runtimes (SDNQ's pipeline, a GGUF file) share: the plan in the runtime's formats,
and the pipeline's other components in the export's floating point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from mpq.errors import MpqError
from mpq.quant.formats import Key, resolve
from mpq.quant.structure import PREFIX

F = TypeVar("F")


def runtime_plan(plan: Mapping[str, Key], cls: type[F], stored_by: str, fmt: str, candidates: str) -> dict[str, F]:
    """{module path: format} of a weight plan, each layer's format a ``cls``; a one-line error for any other, or
    for a plan that quantizes nothing."""
    out: dict[str, F] = {}
    for name, key in plan.items():
        found = resolve(key)
        if not isinstance(found, cls):
            raise MpqError(
                f"layer '{name}' is planned at {key}, which {stored_by} does not store: `--format {fmt}` exports plans "
                f"of {candidates} candidates (quant.weight_formats, or target: {fmt}); export this plan with "
                "`--format mpq`"
            )
        out[name[len(PREFIX) :] if name.startswith(PREFIX) else name] = found
    if not out:
        raise MpqError(f"the plan quantizes no weight: nothing for {stored_by} to store (export it with --format mpq)")
    return out


def cast_others(pipe: Any, component: str, dtype: torch.dtype) -> None:
    """Every component but the denoiser to ``dtype`` (what the export keeps floating point)."""
    for name, module in pipe.components.items():
        if name != component and isinstance(module, torch.nn.Module):
            module.to(dtype)
