"""``UNet2DConditionModel``: SD1.5, SD2, SDXL, SDXL-Turbo (CLIP text, cross-attention, epsilon/v prediction)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mpq.families.base import Family, cross_attention_kv


class UNetFamily(Family):
    name = "unet"
    denoiser_class = "UNet2DConditionModel"
    component = "unet"
    models = "SD1.5, SD2, SDXL, SDXL-Turbo"
    first_token_constant = True  # the published text encoders (CLIP first); --meta only
    sample_key = "sample"
    content = ("attn2", "ff")
    content_reason = (
        "text enters through cross-attention (attn2) and what it writes is spread by the feed-forward (ff) of the "
        "same transformer blocks (MixDQ's content group)"
    )

    def text_layers(self, denoiser: nn.Module) -> set[str]:
        return cross_attention_kv(denoiser)

    def example_inputs(
        self, config: Mapping[str, Any], side: int, tokens: int, batch: int, device: str | torch.device
    ) -> dict[str, Any]:
        cross = config["cross_attention_dim"]
        cross = cross if isinstance(cross, int) else cross[0]
        kwargs: dict[str, Any] = {
            "sample": torch.zeros(batch, config.get("in_channels", 4), side, side, device=device),
            "timestep": torch.full((batch,), 999, device=device),
            "encoder_hidden_states": torch.zeros(batch, tokens, cross, device=device),
        }
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, pooled, device=device),
                "time_ids": torch.zeros(batch, 6, device=device),
            }
        return kwargs

    def text_tokens(self, arch: Mapping[str, Any], max_sequence_length: int | None) -> int:
        return int(arch["text_max_length"])  # CLIP: fixed 77 tokens

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], guidance: bool, max_sequence_length: int | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        out = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance
        )
        if "pooled_prompt_embeds" in inspect.signature(pipe.__call__).parameters:  # SDXL: two encoders, pooled
            pe, npe, ppe, nppe = out
            kwargs = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
            if guidance:
                kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
            return kwargs
        pe, npe = out[:2]  # SD1.5 / SD2
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe} if guidance else {"prompt_embeds": pe}
