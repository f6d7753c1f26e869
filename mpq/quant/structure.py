"""What the quantizer must know about a layer's place in the network, found from the model itself.

* **Concatenated inputs** (``in_split``): a UNet up block concatenates its
  upsampled features with a skip connection, ``cat([hidden, skip], dim=1)``,
  and feeds that to each resnet, whose ``conv_shortcut`` sees two halves at
  very different scales. A forward pre-hook on every module called with
  ``res_hidden_states_tuple`` (diffusers' up blocks) reads the skip tensors
  it is given: resnet ``i`` concatenates ``res_hidden_states_tuple[-1 - i]``,
  so its input splits at ``in_channels - skip channels``.
* **BOS-aware layers**: ``to_k`` / ``to_v`` of every cross-attention
  (diffusers ``Attention`` with ``is_cross_attention``) read the text
  encoder's tokens, whose first (BOS) token is an outlier in CLIP models.

Both, and each layer's input size, come from one forward (:func:`trace`): on the first
calibration sample at PTQ, or on the ``meta`` device for ``mpq layers --meta``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PREFIX = "model."


def quantizable_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """{``model.<path>``: module} for every Linear and Conv2d, in module order."""
    return {PREFIX + path: m for path, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@dataclass
class Structure:
    act_numel: dict[str, int] = field(default_factory=dict)  # input elements per sample
    in_split: dict[str, tuple[int, ...]] = field(default_factory=dict)  # channel boundaries of a concatenated input
    bos: set[str] = field(default_factory=set)  # layers reading text tokens (first token BOS)

    def enabled(self, split: bool, bos: bool) -> Structure:
        """This structure with the input splits and BOS layers kept only where the config turns them on."""
        return Structure(dict(self.act_numel), dict(self.in_split) if split else {}, set(self.bos) if bos else set())


def bos_layers(denoiser: nn.Module) -> set[str]:
    """``to_k`` / ``to_v`` of every cross-attention module."""
    out = set()
    for path, m in denoiser.named_modules():
        if getattr(m, "is_cross_attention", False):
            for child in ("to_k", "to_v"):
                if isinstance(getattr(m, child, None), nn.Linear):
                    out.add(f"{PREFIX}{path}.{child}" if path else f"{PREFIX}{child}")
    return out


def _takes_skips(module: nn.Module) -> bool:
    try:
        return "res_hidden_states_tuple" in inspect.signature(module.forward).parameters and hasattr(module, "resnets")
    except (TypeError, ValueError):
        return False


def trace(denoiser: nn.Module, inputs: Mapping[str, Any]) -> Structure:
    """Run ``denoiser(**inputs)`` once with hooks recording the structure (use the meta device)."""
    st = Structure(bos=bos_layers(denoiser))
    names = {m: n for n, m in quantizable_modules(denoiser).items()}
    paths = {m: p for p, m in denoiser.named_modules()}
    batch = inputs["sample"].shape[0]

    def on_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        st.act_numel[names[module]] = args[0].numel() // batch

    def on_up_block(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        skips = kwargs.get("res_hidden_states_tuple")
        if skips is None:
            return
        for i, resnet in enumerate(module.resnets):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if isinstance(shortcut, nn.Conv2d) and i < len(skips):
                c_in, c_skip = shortcut.in_channels, skips[-1 - i].shape[1]
                if 0 < c_in - c_skip < c_in:
                    st.in_split[names[shortcut]] = (0, c_in - c_skip, c_in)

    handles = [m.register_forward_pre_hook(on_input) for m in names]
    handles += [m.register_forward_pre_hook(on_up_block, with_kwargs=True) for m in paths if _takes_skips(m)]
    try:
        with torch.no_grad():
            denoiser(**inputs)
    finally:
        for h in handles:
            h.remove()
    return st


def example_inputs(
    arch: Mapping[str, Any], resolution: int, batch: int = 1, device: str | torch.device = "meta"
) -> dict[str, Any]:
    """Denoiser kwargs of the right shapes for one call at ``resolution`` px."""
    cfg = arch["unet"]
    side = resolution // arch["vae_scale_factor"]
    cross = cfg["cross_attention_dim"]
    cross = cross if isinstance(cross, int) else cross[0]
    kwargs: dict[str, Any] = {
        "sample": torch.zeros(batch, cfg.get("in_channels", 4), side, side, device=device),
        "timestep": torch.full((batch,), 999, device=device),
        "encoder_hidden_states": torch.zeros(batch, arch["text_max_length"], cross, device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    return kwargs
