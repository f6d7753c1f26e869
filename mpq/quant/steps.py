"""Timestep-aware activation ranges: which step group a denoiser call belongs to.

A sampler's calls see inputs of very different ranges (the timestep embedder's input is the timestep itself; at
the last, nearly clean step the patch embedding and the output modulation see other values than at the first),
so one activation range over every step fits some steps badly. With ``quant.act.step_groups: G`` each layer keeps
one range (and each candidate bit's scale and zero point) per group of steps besides the all-steps one
(Q-Diffusion's step-wise calibration, ViDiT-Q's timestep-aware quantization, coarsened into groups).

Groups are ranges of the denoiser's own ``timestep`` input, not call counts, so a run with another number of
steps (or a scheduler that calls the denoiser twice a step) still finds the range fitted to its noise level: the
recorded calls' distinct timesteps, sorted, are cut into ``G`` runs of nearly equal size, and the boundaries are
the midpoints between neighbouring runs. Group 0 holds the lowest timesteps (the last steps of a generation).
A forward pre-hook on the denoiser (:func:`attach`) reads each call's timestep and sets the group of every layer
that has step groups. A call whose timesteps differ across the batch is refused: its rows would need different
ranges.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mpq.errors import MpqError

HOOK_ATTR = "_mpq_step_groups_hook"  # the denoiser attribute holding its one pre-hook handle


def step_bounds(timesteps: Iterable[float], groups: int) -> list[float]:
    """The ``groups - 1`` ascending boundaries that cut the distinct ``timesteps`` into ``groups`` runs of nearly
    equal size (midpoints between neighbouring runs)."""
    ts = sorted({float(t) for t in timesteps})
    if groups < 1:
        raise MpqError(f"config key 'quant.act.step_groups' is {groups}; use 1 (one range for all steps) or more")
    if groups > len(ts):
        raise MpqError(
            f"config key 'quant.act.step_groups' is {groups}, but the calibration data holds {len(ts)} distinct "
            f"timesteps; use at most {len(ts)} (or record more sampling steps)"
        )
    cuts = [round(g * len(ts) / groups) for g in range(1, groups)]
    return [(ts[c - 1] + ts[c]) / 2.0 for c in cuts]


def group_of(t: float, bounds: Sequence[float]) -> int:
    """The step group of timestep ``t``: how many boundaries lie below it."""
    return bisect.bisect_right(list(bounds), float(t))


def call_timestep(t: Any) -> float:
    """The one timestep of a denoiser call (a number, or a tensor holding the same value for every row)."""
    if isinstance(t, torch.Tensor):
        flat = t.detach().reshape(-1).float()
        if flat.numel() == 0:
            raise MpqError("the denoiser was called with an empty timestep")
        if flat.numel() > 1 and not bool(torch.all(flat == flat[0])):
            raise MpqError(
                "step-grouped activation ranges need one timestep per denoiser call, got several in one batch; "
                "call the denoiser once per timestep (or quantize with quant.act.step_groups=1)"
            )
        return float(flat[0])
    return float(t)


def grouped(module: nn.Module) -> bool:
    """Whether a (quantized or packed) layer keeps activation ranges per step group."""
    return int(getattr(module, "step_groups", 1)) > 1


class StepGroupHook:
    """The denoiser's forward pre-hook: each call's timestep sets the active step group of every grouped layer."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        try:
            params = list(inspect.signature(denoiser.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self.position = params.index("timestep") if "timestep" in params else None

    def layers(self) -> list[nn.Module]:
        return [m for m in self.denoiser.modules() if grouped(m)]

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        layers = self.layers()
        if not layers:
            return
        t = kwargs.get("timestep")
        if t is None and self.position is not None and self.position < len(args):
            t = args[self.position]
        if t is None:
            raise MpqError(
                "the denoiser was called without a timestep, so its step-grouped activation ranges cannot be "
                "chosen; pass timestep= (or quantize with quant.act.step_groups=1)"
            )
        value = call_timestep(t)
        for layer in layers:
            layer.a_group = group_of(value, layer.step_bounds())  # type: ignore[operator]


class StepRanges:
    """What a layer with step groups does the same whether fake-quantized (:class:`~mpq.quant.layers.QuantLayer`)
    or packed (:class:`~mpq.export.packed.PackedLayer`): its groups' boundaries read once from ``a_step_bounds`` (no
    device sync per layer and call), the activation scale and zero point that apply now, and moves and casts that
    keep the boundaries exact and fp32 (a timestep boundary rounded to bf16 could move a call into another group;
    Flux's sigmas are 0..1). Mixed in before ``nn.Module``; the layer sets ``step_groups`` and ``a_group``."""

    step_groups: int
    a_group: int | None
    a_scale: torch.Tensor
    a_zero: torch.Tensor
    a_step_scale: torch.Tensor
    a_step_zero: torch.Tensor
    a_step_bounds: torch.Tensor
    _bounds: list[float] | None = None  # ``a_step_bounds`` as numbers (:meth:`step_bounds`)
    _buffers: dict[str, torch.Tensor | None]

    def step_bounds(self) -> list[float]:
        """The step groups' timestep boundaries, ascending ([] without step groups)."""
        if self.step_groups == 1:
            return []
        if self._bounds is None:
            self._bounds = [float(v) for v in self.a_step_bounds.tolist()]
        return self._bounds

    def _group(self) -> int | None:
        """The step group whose range applies now (None: the all-steps range)."""
        return self.a_group if self.step_groups > 1 else None

    def _act_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the range that applies now: the active step group's, else the all-steps ones."""
        g = self._group()
        return (self.a_scale, self.a_zero) if g is None else (self.a_step_scale[g], self.a_step_zero[g])

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        bounds = self._buffers.get("a_step_bounds") if self.step_groups > 1 else None
        exact = self.step_bounds() if bounds is not None and not bounds.is_meta else None  # read before any cast
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        moved = self._buffers.get("a_step_bounds")
        if exact is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["a_step_bounds"] = torch.tensor(exact, dtype=torch.float32, device=moved.device)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._bounds = None  # re-read from the loaded a_step_bounds
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def attach(denoiser: nn.Module) -> None:
    """Register the step-group pre-hook on ``denoiser`` once (a no-op for calls while no layer is grouped)."""
    if getattr(denoiser, HOOK_ATTR, None) is None:
        handle = denoiser.register_forward_pre_hook(StepGroupHook(denoiser), with_kwargs=True)
        object.__setattr__(denoiser, HOOK_ATTR, handle)
