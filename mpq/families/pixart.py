"""``PixArtTransformer2DModel``: PixArt-alpha / PixArt-Sigma (a DiT with cross-attention to T5 text)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mpq.families.base import Family, cross_attention_kv, named_linears


class PixArtFamily(Family):
    name = "pixart"
    denoiser_class = "PixArtTransformer2DModel"
    component = "transformer"
    models = "PixArt-alpha, PixArt-Sigma"
    first_token_constant = False  # the published text encoders (T5); --meta only
    sample_key = "hidden_states"
    content = ("attn2", "ff", "caption_projection")
    content_reason = (
        "as in the UNet, text enters through cross-attention (attn2) after the caption projection, and the "
        "feed-forward (ff) of each block carries it on"
    )

    def text_layers(self, denoiser: nn.Module) -> set[str]:
        return cross_attention_kv(denoiser) | named_linears(denoiser, ["caption_projection.linear_1"])

    def default_text_tokens(self, pipeline_class: str) -> int:
        return 120 if pipeline_class == "PixArtAlphaPipeline" else 300  # the pipelines' max_sequence_length

    def example_inputs(
        self, config: Mapping[str, Any], side: int, tokens: int, batch: int, device: str | torch.device
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "hidden_states": torch.zeros(batch, config.get("in_channels", 4), side, side, device=device),
            "encoder_hidden_states": torch.zeros(batch, tokens, config["caption_channels"], device=device),
            "timestep": torch.full((batch,), 999, device=device),
            "encoder_attention_mask": torch.ones(batch, tokens, device=device),
        }
        if config.get("use_additional_conditions"):
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.zeros(batch, 2, device=device),
                "aspect_ratio": torch.zeros(batch, 1, device=device),
            }
        return kwargs

    def call_kwargs(self, pipe: Any, max_sequence_length: int | None) -> dict[str, Any]:
        # the configured size, not a resolution bin; prompts as written (caption cleaning depends on optional packages)
        kwargs: dict[str, Any] = {"use_resolution_binning": False, "clean_caption": False}
        if max_sequence_length:
            kwargs["max_sequence_length"] = max_sequence_length
        return kwargs

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], guidance: bool, max_sequence_length: int | None, device: torch.device
    ) -> dict[str, Any]:
        extra = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
        pe, pam, npe, npam = pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=guidance, device=device, clean_caption=False, **extra
        )
        kwargs: dict[str, Any] = {"prompt_embeds": pe, "prompt_attention_mask": pam}
        if guidance:  # the call's negative_prompt defaults to "": it must be None beside the embeddings
            kwargs.update(negative_prompt=None, negative_prompt_embeds=npe, negative_prompt_attention_mask=npam)
        return kwargs
