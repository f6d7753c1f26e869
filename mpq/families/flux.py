"""``FluxTransformer2DModel``: Flux.1 schnell / dev (MMDiT double-stream blocks, then single-stream blocks over the
joined tokens; flow matching; dev embeds the guidance scale instead of running guidance)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mpq.families.base import MMDiT


class FluxFamily(MMDiT):
    name = "flux"
    denoiser_class = "FluxTransformer2DModel"
    component = "transformer"
    models = "Flux.1 schnell, Flux.1 dev"
    first_token_constant = False  # the published text encoders (T5); --meta only
    shared_inputs = ("img_ids", "txt_ids")  # token positions, (tokens, 3): the same for every row
    content_reason = (
        "the double-stream blocks' text stream (add_q/k/v_proj, to_add_out, ff_context), its entry "
        "(context_embedder) and their image feed-forward (ff), as for SD3; a single-stream block runs one set of "
        "weights over the joined text and image tokens -- mostly image tokens -- so it counts as quality"
    )

    def default_text_tokens(self, pipeline_class: str) -> int:
        return 512  # FluxPipeline's max_sequence_length

    def example_inputs(
        self, config: Mapping[str, Any], side: int, tokens: int, batch: int, device: str | torch.device
    ) -> dict[str, Any]:
        n_img = (side // 2) ** 2  # 2x2 latent patches packed into tokens
        kwargs: dict[str, Any] = {
            "hidden_states": torch.zeros(batch, n_img, config.get("in_channels", 64), device=device),
            "encoder_hidden_states": torch.zeros(batch, tokens, config["joint_attention_dim"], device=device),
            "pooled_projections": torch.zeros(batch, config["pooled_projection_dim"], device=device),
            "timestep": torch.full((batch,), 1.0, device=device),
            "img_ids": torch.zeros(n_img, 3, device=device),
            "txt_ids": torch.zeros(tokens, 3, device=device),
        }
        if config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device)
        return kwargs

    def pack_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape  # 2x2 patches packed into tokens, as FluxPipeline does
        return pipe._pack_latents(latents, n, c, h, w)

    def flow_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep  # FluxPipeline passes sigma itself (timestep / 1000)

    def doubles_batch(self, guidance_scale: float) -> bool:
        return False  # dev embeds the scale (a denoiser input); schnell ignores it

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], guidance: bool, max_sequence_length: int | None, device: torch.device
    ) -> dict[str, torch.Tensor]:
        extra = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
        pe, ppe, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device, **extra)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}  # Flux's guidance is embedded: no negative half
