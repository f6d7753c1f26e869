"""Hooks on a running pipeline: every component call's inputs and outputs, and every quantizable layer's.

A *component call* is one call of a text encoder, the denoiser, the scheduler's ``step``, the VAE's ``decode`` or
the pipeline's ``prepare_latents`` (the initial latents). Its inputs and outputs are flattened to ``name -> tensor``
maps (``input.sample``, ``input.added_cond_kwargs.text_embeds``, ``output.0`` ...; non-tensor values are left
out). A handler sees each call as it returns and may give back a replacement output (the isolated mode feeds the
FP outputs on). Steps are counted by the scheduler's ``step`` calls: the denoiser calls before the first ``step``
are step 0.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class CallId:
    """Which call: ``component`` (``text_encoder``, ``unet``, ``scheduler``, ``vae``, ``latents`` ...), its
    ``index`` among that component's calls, and the sampling ``step`` for denoiser and scheduler calls."""

    component: str
    index: int
    step: int | None = None
    in_step: int = 0  # the denoiser's call number within the step (true CFG calls it twice a step)

    @property
    def key(self) -> str:
        if self.step is None:
            return f"{self.component}/{self.index}"
        return f"{self.component}/step{self.step:03d}" + (f".{self.in_step}" if self.in_step else "")


def flatten(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors inside ``obj`` (tensors, mappings, dataclass-like model outputs, lists, tuples) by dotted name."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    return out


def replace_tensors(obj: Any, tensors: Mapping[str, torch.Tensor], prefix: str) -> Any:
    """``obj`` with every tensor :func:`flatten` names ``prefix...`` replaced by ``tensors``' (cast to the
    replaced tensor's dtype and device); the structure is kept."""
    if isinstance(obj, torch.Tensor):
        t = tensors.get(prefix)
        return obj if t is None else t.to(dtype=obj.dtype, device=obj.device)
    if isinstance(obj, Mapping):
        new = copy.copy(obj)
        for k, v in obj.items():
            new[k] = replace_tensors(v, tensors, f"{prefix}.{k}")
        return new
    if isinstance(obj, tuple):
        items = [replace_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [replace_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def call_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, a in enumerate(args):
        out.update(flatten(a, f"input.{i}"))
    for k, v in kwargs.items():
        out.update(flatten(v, f"input.{k}"))
    return out


# handler(call, inputs, outputs, output object) -> a replacement output object, or None to keep it
Handler = Callable[[CallId, dict[str, torch.Tensor], dict[str, torch.Tensor], Any], Any]
# layer handler(layer name, call index of that layer, step, input, output) -> a replacement output, or None
LayerHandler = Callable[[str, int, int, torch.Tensor, torch.Tensor], Any]


class Tracer:
    """Install with ``with Tracer(pipe, denoiser_key, handler, layers, layer_handler):``; every hook and wrapper is
    removed on exit, whatever happens inside."""

    def __init__(
        self,
        pipe: Any,
        denoiser: str,
        handler: Handler,
        layers: Mapping[str, nn.Module] | None = None,
        layer_handler: LayerHandler | None = None,
    ) -> None:
        self.pipe, self.denoiser, self.handler = pipe, denoiser, handler
        self.layers, self.layer_handler = dict(layers or {}), layer_handler
        self.counts: dict[str, int] = {}
        self.layer_counts: dict[str, int] = {}
        self.step = 0
        self.in_step = 0

    # ------------------------------------------------------------------ calls
    def _call_id(self, component: str) -> CallId:
        index = self.counts.get(component, 0)
        self.counts[component] = index + 1
        if component == self.denoiser:
            cid = CallId(component, index, self.step, self.in_step)
            self.in_step += 1
            return cid
        if component == "scheduler":
            return CallId(component, index, self.step)
        return CallId(component, index)

    def _record(self, component: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any) -> Any:
        cid = self._call_id(component)
        new = self.handler(cid, call_inputs(args, kwargs), flatten(output, "output"), output)
        if component == "scheduler":
            self.step, self.in_step = self.step + 1, 0
        return output if new is None else new

    def _module_hook(self, component: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            return self._record(component, args, kwargs, output)

        return hook

    def _wrap(self, owner: Any, method: str, component: str) -> None:
        original = getattr(owner, method)

        @functools.wraps(original)  # pipelines read the signature (``scheduler.step``'s generator, eta)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._record(component, args, kwargs, original(*args, **kwargs))

        setattr(owner, method, wrapper)
        self._wrapped.append((owner, method))

    def _layer_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            index = self.layer_counts.get(name, 0)
            self.layer_counts[name] = index + 1
            assert self.layer_handler is not None
            return self.layer_handler(name, index, self.step, args[0], output)

        return hook

    # ------------------------------------------------------------------ install
    def __enter__(self) -> Tracer:
        self._handles: list[Any] = []
        self._wrapped: list[tuple[Any, str]] = []
        try:
            for name in (*TEXT_ENCODERS, self.denoiser):
                module = getattr(self.pipe, name, None)
                if isinstance(module, nn.Module):
                    self._handles.append(module.register_forward_hook(self._module_hook(name), with_kwargs=True))
            for name, module in self.layers.items():
                if self.layer_handler is not None:
                    self._handles.append(module.register_forward_hook(self._layer_hook(name)))
            self._wrap(self.pipe, "prepare_latents", "latents")
            self._wrap(self.pipe.scheduler, "step", "scheduler")
            self._wrap(self.pipe.vae, "decode", "vae")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for owner, method in self._wrapped:
            if method in vars(owner):
                delattr(owner, method)
        self._handles, self._wrapped = [], []


@contextmanager
def tracing(
    pipe: Any,
    denoiser: str,
    handler: Handler,
    layers: Mapping[str, nn.Module] | None = None,
    layer_handler: LayerHandler | None = None,
) -> Iterator[Tracer]:
    with Tracer(pipe, denoiser, handler, layers, layer_handler) as t:
        yield t
