"""``SD3Transformer2DModel``: SD3 / SD3.5 (MMDiT: a text stream and an image stream in joint attention; flow
matching)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mpq.families.base import MMDiT


class SD3Family(MMDiT):
    name = "sd3"
    denoiser_class = "SD3Transformer2DModel"
    component = "transformer"
    models = "SD3, SD3.5"
    first_token_constant = True  # the published text encoders (CLIP first); --meta only
    content_reason = (
        "MMDiT has no cross-attention: the text tokens have their own stream, whose projections (add_q/k/v_proj, "
        "to_add_out), feed-forward (ff_context) and entry (context_embedder) play attn2's role, and the image "
        "stream's feed-forward (ff) plays ff's, as MixDQ's attn2 + ff on SDXL (measured best on the trained "
        "tiny-sd3); SD3.5's attn2 is a second self-attention over image tokens, so it counts as quality"
    )

    def text_tokens(self, arch: Mapping[str, Any], max_sequence_length: int | None) -> int:
        clip = int(arch.get("clip_tokens", 77))  # CLIP's 77 tokens, then T5's
        return clip + int(max_sequence_length or arch["text_max_length"] - clip)

    def default_text_tokens(self, pipeline_class: str) -> int:
        return 77 + 256  # CLIP's tokens, then T5's (max_sequence_length 256)

    def example_inputs(
        self, config: Mapping[str, Any], side: int, tokens: int, batch: int, device: str | torch.device
    ) -> dict[str, Any]:
        return {
            "hidden_states": torch.zeros(batch, config.get("in_channels", 16), side, side, device=device),
            "encoder_hidden_states": torch.zeros(batch, tokens, config["joint_attention_dim"], device=device),
            "pooled_projections": torch.zeros(batch, config["pooled_projection_dim"], device=device),
            "timestep": torch.full((batch,), 999.0, device=device),
        }

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], guidance: bool, max_sequence_length: int | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        extra = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=guidance,
            **extra,
        )
        kwargs = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if guidance:
            kwargs.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        return kwargs
