"""The second embedded model's architecture: a tiny SD3.5-architecture pipeline (``embedded:tiny-sd3``).

A ``StableDiffusion3Pipeline`` with the same component kinds as SD3.5 Medium
but small, for the procedural shapes world (:mod:`mpq.shapes`):

* ``SD3Transformer2DModel`` (MMDiT): 4 joint-attention blocks of width 96
  (3 heads of 32), a text stream and an image stream with AdaLN modulation,
  RMS qk-norm, the first two blocks with SD3.5's dual attention (``attn2``, a
  second self-attention over image tokens), the last block context-pre-only;
  2x2 patches of a 16x16x4 latent (64 image tokens);
* the two CLIP text encoders of ``embedded:tiny-sdxl``, reused frozen (the
  first gains an identity ``text_projection``: SD3 reads both pooled outputs);
  no T5 (``text_encoder_3=None``: the pipeline feeds ``max_sequence_length``
  zero tokens in its place, as SD3 without T5 does);
* the VAE of ``embedded:tiny-sdxl`` (``shift_factor`` 0);
* ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0.

The transformer is trained with flow matching (rectified flow, v = noise - x0),
10% of its captions dropped to "" so classifier-free guidance works; it is
sampled with 4 Euler steps and guidance 2.0 by default. Weights ship in
``mpq/models/weights/tiny-sd3`` and are made by
``python scripts/train_tiny.py --model tiny-sd3`` (:mod:`mpq.shapes.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SEED = 20241204  # the untrained transformer is the same on every machine
T5_TOKENS = 8  # the zero tokens standing in for T5 (the pipeline's max_sequence_length): default sampling uses this
STEPS = 4

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "joint_attention_dim": 64,  # the two CLIPs' hidden states side by side (32 + 32)
    "caption_projection_dim": 96,
    "pooled_projection_dim": 64,  # both pooled outputs (32 + 32)
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0, 1],
    "qk_norm": "rms_norm",
}

SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}


def _with_projection(text_encoder: Any) -> Any:
    """``CLIPTextModel`` -> ``CLIPTextModelWithProjection`` with the same weights and an identity projection."""
    from transformers import CLIPTextModelWithProjection

    cfg = text_encoder.config
    cfg.projection_dim = cfg.hidden_size
    out = CLIPTextModelWithProjection(cfg)
    out.text_model.load_state_dict(text_encoder.state_dict())  # CLIPTextModel is the bare text model
    with torch.no_grad():
        out.text_projection.weight.copy_(torch.eye(cfg.hidden_size))
    return out.eval()


def build_pipeline(base: str | Path, seed: int = SEED) -> Any:
    """The untrained pipeline: a new transformer from ``seed``, the VAE and text encoders of the tiny-sdxl
    folder ``base`` (the shipped one by default in training)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = Path(base)
    vae = AutoencoderKL.from_pretrained(base / "vae")
    vae.register_to_config(shift_factor=0.0)
    text_encoder = _with_projection(CLIPTextModel.from_pretrained(base / "text_encoder"))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    finally:
        torch.random.set_rng_state(state)
    # the tokenizer the CLIPs were trained with, loaded, not rebuilt: the BPE trainer orders merges of equal count
    # arbitrarily, so a rebuilt tokenizer may give a word another id than the one its CLIP embedding learned
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe
