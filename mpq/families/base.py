"""What mpq must know about one family of denoisers: the :class:`Family` adapter every family file fills in.

Everything family-specific lives in its adapter, nowhere else: the denoiser's
input names and which recorded inputs are not batch-major, the layers that
read the text (where a constant first token may exist), the default content
group and why, how to make example inputs for a trace on the meta device, and
how a pipeline of the family encodes prompts once (SSIM and selection reuse the
embeddings, since the text encoders are never quantized).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

PREFIX = "model."  # layer names are "model." + module path (MixDQ's names)


class Family:
    """The adapter of one denoiser class (a subclass per family file, registered in :mod:`mpq.families`)."""

    name: ClassVar[str]  # short name: unet | pixart | sd3 | flux
    denoiser_class: ClassVar[str]  # the diffusers class
    component: ClassVar[str]  # the pipeline's component holding the denoiser
    models: ClassVar[str]  # the published models of the family (for messages and the README)
    sample_key: ClassVar[str]  # the denoiser's noisy-latent input
    # whether the published text encoders give every prompt the same first token (a run finds it from its data; the
    # meta-device description, which has no data, assumes this)
    first_token_constant: ClassVar[bool] = False
    shared_inputs: ClassVar[tuple[str, ...]] = ()  # recorded inputs not batch-major (one copy for every row)
    content: ClassVar[tuple[str, ...]]  # default content-group patterns (see ``groups.content``)
    content_reason: ClassVar[str]  # why, one sentence (README, `mpq layers`)
    text_key: ClassVar[str] = "encoder_hidden_states"  # the denoiser's text-token input

    # ------------------------------------------------------------------ layers
    def text_layers(self, denoiser: nn.Module) -> set[str]:
        """Layers whose input is the text tokens themselves (``model.`` names): where a constant first token (CLIP's
        BOS) can reach a layer unchanged. Which of them really see one is found from the calibration data."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inputs
    def text_tokens(self, arch: Mapping[str, Any], max_sequence_length: int | None) -> int:
        """Text tokens the denoiser sees per prompt."""
        return int(max_sequence_length or arch["text_max_length"])

    def default_text_tokens(self, pipeline_class: str) -> int:
        """Text tokens the denoiser sees per prompt when a pipeline of ``pipeline_class`` runs with its defaults."""
        return 77  # CLIP

    def example_inputs(
        self, config: Mapping[str, Any], side: int, tokens: int, batch: int, device: str | torch.device
    ) -> dict[str, Any]:
        """Denoiser kwargs of the right shapes for one call on a ``side`` x ``side`` latent."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pipelines
    def call_kwargs(self, pipe: Any, max_sequence_length: int | None) -> dict[str, Any]:
        """Extra keyword arguments of every pipeline call (beyond prompts, steps, guidance, size, generators)."""
        return {}

    def encode_prompts(
        self, pipe: Any, prompts: Sequence[str], guidance: bool, max_sequence_length: int | None, device: torch.device
    ) -> dict[str, Any]:
        """The prompts encoded once, as the pipeline-call kwargs that replace ``prompt`` (negative halves included
        when ``guidance``)."""
        raise NotImplementedError

    def pack_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (N, C, H, W) in the layout of the denoiser's sample input (the Fisher estimator noises the FP
        images' latents)."""
        return latents

    def flow_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """A flow-matching denoiser's noise level from its recorded ``timestep`` input (SD3: sigma x 1000)."""
        return timestep / 1000.0

    def doubles_batch(self, guidance_scale: float) -> bool:
        """Whether the pipeline runs classifier-free guidance at ``guidance_scale``: each denoiser call then holds
        a negative and a positive row per image."""
        return guidance_scale > 1.0

    def describe(self) -> str:
        return f"{self.denoiser_class} ({self.models})"


def cross_attention_kv(denoiser: nn.Module) -> set[str]:
    """``to_k`` / ``to_v`` of every cross-attention module (diffusers ``Attention.is_cross_attention``)."""
    out = set()
    for path, m in denoiser.named_modules():
        if getattr(m, "is_cross_attention", False):
            for child in ("to_k", "to_v"):
                if isinstance(getattr(m, child, None), nn.Linear):
                    out.add(f"{PREFIX}{path}.{child}" if path else f"{PREFIX}{child}")
    return out


def named_linears(denoiser: nn.Module, leaves: Sequence[str]) -> set[str]:
    """Every Linear whose module path ends with one of ``leaves`` (dotted suffixes)."""
    return {
        PREFIX + path
        for path, m in denoiser.named_modules()
        if isinstance(m, nn.Linear) and any(path == s or path.endswith("." + s) for s in leaves)
    }


# the text stream of a joint (MMDiT) block, as deepcompressor's attn_add / ffn_add groups, and its entry
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "context_embedder")
# the MMDiT content group: the text stream and the image stream's feed-forward, as MixDQ's attn2 + ff on SDXL; measured
# on embedded:tiny-sd3 against the text stream alone, its projections alone and all attention at W3 and W4
# (benchmarks/bench_content_groups.py, README): the best geometric-mean held-out MSE over both budgets
MMDIT_CONTENT = (*TEXT_STREAM, "ff")


class MMDiT(Family):
    """What SD3 and Flux share: a joint text/image transformer whose text enters through ``context_embedder`` and
    then has its own stream in every joint block (with the image feed-forward: the content group); the T5 length is a
    pipeline argument."""

    sample_key = "hidden_states"
    content = MMDIT_CONTENT

    def text_layers(self, denoiser: nn.Module) -> set[str]:
        return named_linears(denoiser, ["context_embedder"])

    def call_kwargs(self, pipe: Any, max_sequence_length: int | None) -> dict[str, Any]:
        return {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
