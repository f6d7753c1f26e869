"""A pipeline with random weights built offline from an architecture file (``mpq/models/arch/*.json``).

The file names the pipeline class and holds the denoiser's, VAE's and
scheduler's published configs (so the denoiser is the real one, full size),
and one entry per text encoder: CLIP or T5, with the real output width but
few layers (T5-XXL's 4.7 B parameters do not fit a small machine; what the
denoiser sees keeps its shape). Tokenizers are built locally
(:mod:`mpq.models.tokenizers`). The same seed gives the same weights on every
machine, so every stage of a run rebuilds the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _words() -> list[str]:
    from mpq.models.tiny import shapes_words

    return shapes_words() + ["photo", "of", "cat", "dog", "city", "night", "red", "fox", "snow", "portrait"]


def _text_encoder(spec: Mapping[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    width, layers = int(spec["hidden_size"]), int(spec.get("layers", 2))
    heads = int(spec.get("heads", max(1, width // 64)))
    if spec["kind"] == "t5":
        cfg = T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=width // heads,
            d_ff=int(spec.get("intermediate_size", 2 * width)),
            num_layers=layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        return T5EncoderModel(cfg)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=int(spec.get("intermediate_size", 2 * width)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=int(spec.get("max_length", 77)),
        projection_dim=int(spec.get("projection_dim", width)),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if spec["kind"] == "clip_projection" else CLIPTextModel)(cfg)


def _tokenizer(spec: Mapping[str, Any]) -> Any:
    from mpq.models.tokenizers import clip_tokenizer, t5_tokenizer

    if spec["kind"] == "t5":
        return t5_tokenizer(_words(), int(spec.get("max_length", 512)))
    return clip_tokenizer(_words(), int(spec.get("max_length", 77)))


def _config(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if not k.startswith("_")}


def build_random(arch: Mapping[str, Any], seed: int) -> Any:
    """The pipeline ``arch`` describes, with random weights drawn from ``seed`` (the global RNG is left as it
    was)."""
    import diffusers

    components: dict[str, Any] = {}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        den = arch["denoiser"]
        components[arch["component"]] = getattr(diffusers, den["_class_name"]).from_config(_config(den)).eval()
        components["vae"] = diffusers.AutoencoderKL.from_config(_config(arch["vae"])).eval()
        for name, spec in arch.get("text_encoders", {}).items():
            tok_name = name.replace("text_encoder", "tokenizer")
            tokenizer = _tokenizer(spec)
            components[tok_name] = tokenizer
            components[name] = _text_encoder(spec, tokenizer).eval()
    finally:
        torch.random.set_rng_state(state)
    sched = arch["scheduler"]
    components["scheduler"] = getattr(diffusers, sched["_class_name"]).from_config(_config(sched))
    components.update(arch.get("pipeline_kwargs", {}))
    return getattr(diffusers, arch["pipeline"])(**components)
