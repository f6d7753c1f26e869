"""What the quantizer must know about a layer's place in the network, found from the model itself.

* **Concatenated inputs** (``in_split``): a UNet up block concatenates its
  upsampled features with a skip connection, ``cat([hidden, skip], dim=1)``,
  and feeds that to each resnet, whose ``conv_shortcut`` sees two halves at
  very different scales. A forward pre-hook on every module called with
  ``res_hidden_states_tuple`` (diffusers' up blocks) reads the skip tensors
  it is given: resnet ``i`` concatenates ``res_hidden_states_tuple[-1 - i]``,
  so its input splits at ``in_channels - skip channels``.
* **BOS-aware layers**: the layers that read the text tokens (the family
  adapter's :meth:`~mpq.families.base.Family.text_layers`), when the text
  encoder gives every prompt the same first token (CLIP's BOS, an outlier):
  found from the recorded text input (:func:`constant_first_token`), not from
  a name. T5 (PixArt, Flux) has none.

Each layer's input size and the split inputs come from one forward (:func:`trace`): on the first
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
    bos: set[str] = field(default_factory=set)  # layers reading the text tokens, whose first token is constant

    def enabled(self, split: bool, bos: bool) -> Structure:
        """This structure with the input splits and BOS layers kept only where the config turns them on."""
        return Structure(dict(self.act_numel), dict(self.in_split) if split else {}, set(self.bos) if bos else set())


def constant_first_token(text: torch.Tensor) -> bool:
    """Whether the first token of a recorded text input (rows, tokens, width) is the same for every prompt: its
    non-zero first rows (an all-zero row, e.g. SDXL's zeroed negative prompt, gives the same output with any
    weight) are at least two and equal up to float rounding (batches of other sizes round differently)."""
    eps = torch.finfo(text.dtype).eps if text.is_floating_point() else 0.0
    rows = text[:, 0].reshape(text.shape[0], -1).double()
    rows = rows[rows.abs().amax(dim=-1) > 0]
    if rows.shape[0] < 2:
        return False
    tol = max(1e-4, 8 * eps) * float(rows[:1].abs().max())  # a few steps of the recorded dtype (fp16: ~1e-2)
    return bool((rows - rows[:1]).abs().max() <= tol)


def _takes_skips(module: nn.Module) -> bool:
    try:
        return "res_hidden_states_tuple" in inspect.signature(module.forward).parameters and hasattr(module, "resnets")
    except (TypeError, ValueError):
        return False


def trace(denoiser: nn.Module, inputs: Mapping[str, Any], constant_text_token: bool) -> Structure:
    """Run ``denoiser(**inputs)`` once with hooks recording the structure (use the meta device);
    ``constant_text_token``: the text encoder's first token is the same for every prompt (BOS-aware text layers)."""
    from mpq.families import family_of

    family = family_of(denoiser)
    st = Structure(bos=family.text_layers(denoiser) if constant_text_token else set())
    names = {m: n for n, m in quantizable_modules(denoiser).items()}
    paths = {m: p for p, m in denoiser.named_modules()}
    batch = inputs[family.sample_key].shape[0]

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
