"""The embedded model's architecture: a tiny SDXL-Turbo-architecture pipeline.

Same component kinds as SDXL-Turbo: two CLIP text encoders (the second with a
projection), a ``UNet2DConditionModel`` with ``text_time`` added conditioning,
resnets with ``time_emb_proj`` and ``conv_shortcut``, down/upsamplers, linear
``proj_in``/``proj_out``, ``attn1``/``attn2``/``ff`` transformer blocks; an 8x
``AutoencoderKL``; EulerAncestral with trailing timesteps. So every layer name
and group behaves as on SDXL (123 quantizable layers, 36 in the content group).

Two differences from SDXL, both for the procedural shapes world it is trained
on (:mod:`mpq.shapes`):

* a word-level CLIP BPE tokenizer whose merges make each word of the shapes
  vocabulary one token (any other text still tokenizes, character by character);
* v-prediction (SDXL-Turbo: epsilon + adversarial distillation). At the first,
  pure-noise step, v ~ -x0 is well conditioned, so a plain diffusion loss gives
  a model that samples in 1-4 steps with no distillation: a caption fixes its
  image up to a few pixels of jitter, so the first step's x0 estimate is
  already nearly sharp, and the next steps only settle the jitter.

:func:`build_pipeline` makes the untrained pipeline from a seed; the trained
weights ship with the package (``mpq/models/weights/tiny-sdxl``) and are made by
``scripts/train_tiny.py`` (:mod:`mpq.shapes.train`).
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SEED = 20240924  # any fixed value: the untrained model must be the same on every machine
TEXT_MAX_LENGTH = 77
TEXT_HIDDEN = 32  # each text encoder; cross-attention dim = 2 * TEXT_HIDDEN as in SDXL (768 + 1280)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
RESOLUTION = 128

UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 2 * TEXT_HIDDEN,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "transformer_layers_per_block": [1, 1],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + TEXT_HIDDEN,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [8, 16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "norm_num_groups": 2,  # 4 channels a group at full resolution: one channel a group would erase absolute colors
    "layers_per_block": 1,
    "sample_size": RESOLUTION,
    "scaling_factor": 1.0,  # set from the trained encoder's latent std (as SD did)
    "mid_block_add_attention": False,
    "force_upcast": False,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
}


def arch() -> dict[str, Any]:
    """Architecture facts for building the denoiser on the meta device."""
    return {
        "unet": dict(UNET_CONFIG),
        "vae_scale_factor": 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1),
        "text_max_length": TEXT_MAX_LENGTH,
    }


def shapes_words() -> list[str]:
    """Every word of the shapes grammar (:mod:`mpq.shapes.data`)."""
    from mpq.shapes.data import VOCAB

    fixed = ["a", "an", "at", "the", "in", "on", "background"]
    return sorted(set(fixed + [w for values in VOCAB.values() for v in values for w in v.split()]))


def build_tokenizer() -> Any:
    """A CLIP BPE tokenizer whose merges make each word of the shapes vocabulary one token."""
    from mpq.models.tokenizers import clip_tokenizer

    return clip_tokenizer(shapes_words(), TEXT_MAX_LENGTH)


def build_pipeline(seed: int = TINY_SEED) -> Any:
    """The untrained pipeline (deterministic: same weights on every machine for a seed)."""
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval()
    return pipe
