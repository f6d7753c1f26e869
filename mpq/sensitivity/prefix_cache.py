"""Exact reuse of FP computation that precedes a quantized layer.

With only layer L quantized, every module whose calls all finish before L
starts sees FP inputs, so its output is the FP output. ``PrefixCache``
records every submodule's output (and call span) during an FP forward; in
replay, each such module returns its recorded output instead of computing,
and only L and what runs after it is computed. Replays use the same batches
as the recording, so results are bit-identical to a plain forward.

Memory: the recording holds every module's output for the recorded batches
(about what training would keep for backprop); callers bound it by recording
a few batches at a time (see :meth:`nbytes`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from mpq.errors import MpqError
from mpq.quant.steps import StepGroupHook


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def repeat_batch(obj: Any, n: int, batch: int = 1) -> Any:
    """Repeat every batch-major tensor in ``obj`` (any nesting of tuples, lists, dicts, diffusers outputs)
    ``n`` times along dim 0. Batch-major: dim 0 is a multiple of the batch (a flattened (batch, k) tensor,
    such as SDXL's ``time_ids`` projection, counts too)."""

    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] % batch == 0:
            return t.repeat(n, *([1] * (t.dim() - 1)))
        return t

    return obj if n == 1 else tree_map(rep, obj)  # diffusers' outputs are registered pytree nodes too


def _foreign(pre_hooks: Any) -> bool:
    """Whether a module has pre-hooks besides mpq's step-group hook (which only reads the call's timestep and runs
    in the module's ``__call__``, before the forward the cache replaces)."""
    return any(not isinstance(h, StepGroupHook) for h in pre_hooks.values())


@dataclass
class _Recording:
    sample: torch.Tensor  # the root call's first input, to check a replay matches
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)


class PrefixCache:
    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.mode = "off"  # off | record | replay
        self.records: list[_Recording] = []
        self._tick = itertools.count()
        self._active: _Recording | None = None
        self._skip: frozenset[str] = frozenset()
        self._counters: dict[str, int] = {}
        self._replay_idx = 0
        self.target: str | None = None
        self.tile = 1
        # record no further denoiser call once the recording holds this much (a multi-step, guided generation
        # makes many calls per batch): the calls left unrecorded simply run in full, so numbers do not change
        self.max_bytes = float("inf")
        self._patched: list[tuple[nn.Module, Callable[..., Any]]] = []
        hooked = [
            name or "<root>"
            for name, m in root.named_modules()
            if m._forward_hooks or _foreign(m._forward_pre_hooks) or hasattr(m, "_hf_hook") or "forward" in m.__dict__
        ]
        if hooked:  # it replaces module.forward: offload/compile hooks would be bypassed or double-wrapped
            raise MpqError(
                f"the FP prefix cache cannot run on a model with its own forward hooks or patched forwards "
                f"({hooked[0]}, {len(hooked)} modules; e.g. accelerate offload); use sensitivity.method=naive"
            )
        for name, module in root.named_modules():
            orig = module.forward
            self._patched.append((module, orig))
            module.forward = self._root_call(orig) if module is root else self._module_call(name, orig)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ control
    def record(self) -> None:
        self.mode = "record"

    def replay(self, target: str, tile: int = 1) -> None:
        """Replay recorded calls with ``target`` (a module path) the first module recomputed.

        ``tile`` > 1: the replayed inputs are the recorded ones repeated ``tile`` times along the
        batch (one copy per candidate bit); recorded outputs are repeated the same way."""
        self.mode, self.target, self._replay_idx, self.tile = "replay", target, 0, tile

    def off(self) -> None:
        self.mode, self._active = "off", None

    def clear(self) -> None:
        self.records.clear()
        self.off()

    def close(self) -> None:
        for module, _ in self._patched:
            del module.forward  # drop the instance attribute: the class's forward is back
        self._patched.clear()
        self.clear()

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for rec in self.records:
            for outs in rec.outputs.values():
                for t in _tensors(outs):
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        total += t.untyped_storage().nbytes()
        return total

    def _find(self, sample: torch.Tensor) -> _Recording | None:
        """The recording whose input equals ``sample`` (searched from the last match on)."""
        n = len(self.records)
        batch = sample.shape[0] // self.tile
        for j in range(n):
            rec = self.records[(self._replay_idx + j) % n]
            if (
                rec.sample.shape[0] != batch
                or rec.sample.shape[1:] != sample.shape[1:]
                or rec.sample.device != sample.device
            ):
                continue
            if all(torch.equal(rec.sample, part) for part in sample.split(batch)):
                self._replay_idx = (self._replay_idx + j + 1) % n
                return rec
        return None

    # ------------------------------------------------------------------ wrappers
    def _root_call(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            if self.mode == "record" and self.records and self.nbytes() >= self.max_bytes:
                return orig(*args, **kwargs)
            if self.mode == "record":
                self._active = _Recording(sample=sample.detach().clone())
                try:
                    return orig(*args, **kwargs)
                finally:
                    self.records.append(self._active)
                    self._active = None
            if self.mode == "replay":
                rec = self._find(sample)
                if rec is not None and self.target in rec.spans:
                    start = rec.spans[self.target][0][0]
                    self._skip = frozenset(n for n, spans in rec.spans.items() if spans[-1][1] < start)
                    self._active, self._counters = rec, {}
                    try:
                        return orig(*args, **kwargs)
                    finally:
                        self._active = None
            return orig(*args, **kwargs)

        return call

    def _module_call(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            rec = self._active
            if rec is None:
                return orig(*args, **kwargs)
            if self.mode == "record":
                start = next(self._tick)
                out = orig(*args, **kwargs)
                rec.spans.setdefault(name, []).append((start, next(self._tick)))
                rec.outputs.setdefault(name, []).append(out)
                return out
            if name in self._skip:
                i = self._counters.get(name, 0)
                self._counters[name] = i + 1
                out = rec.outputs[name][i]
                return out if self.tile == 1 else repeat_batch(out, self.tile, rec.sample.shape[0])
            return orig(*args, **kwargs)

        return call
