"""Image generation with a pipeline: fixed per-image seeds, whatever the batching."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from mpq.errors import MpqError
from mpq.runner.files import write_with
from mpq.runner.outputs import OutputKind
from mpq.runner.progress import progress


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """CPU generators: the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class PromptEmbeddings:
    """Prompts encoded once per pipeline, by its family adapter, and reused for every generation of the same batch
    of prompts (the text encoders are never quantized: selection and the report score many plans on the same
    prompts). A pipeline without ``encode_prompt`` gets the prompts themselves."""

    def __init__(self, pipe: Any, cfg: DictConfig) -> None:
        from mpq.families import family_of

        self.pipe, self.cfg, self.family = pipe, cfg, family_of(pipe)
        self.enabled = hasattr(pipe, "encode_prompt")
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def kwargs(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Pipeline-call kwargs that stand for ``prompts``."""
        if not self.enabled:
            return {"prompt": list(prompts)}
        key = tuple(prompts)
        if key not in self._cache:
            c = self.cfg.sampling
            with torch.no_grad():
                self._cache[key] = self.family.encode_prompts(
                    self.pipe,
                    list(prompts),
                    self.family.doubles_batch(c.guidance_scale),
                    c.max_sequence_length,
                    self.pipe._execution_device,
                )
        return self._cache[key]


def call_kwargs(pipe: Any, cfg: DictConfig) -> dict[str, Any]:
    """The pipeline call's sampling arguments as mpq generates (steps, guidance, resolution, the family's own): what
    another process needs to draw the same images without mpq (plain JSON values)."""
    from mpq.families import family_of

    s = cfg.sampling
    return {
        "num_inference_steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "height": s.resolution,
        "width": s.resolution,
        **family_of(pipe).call_kwargs(pipe, s.max_sequence_length),
    }


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: DictConfig,
    batch_size: int | None = None,
    desc: str | None = None,
    output_type: str = "pil",
    text: PromptEmbeddings | None = None,
) -> list[Any]:
    """Generate one image per (prompt, seed). ``output_type='np'`` gives float arrays in [0, 1]; ``text``: reuse
    prompt embeddings encoded once (same images)."""
    from mpq.prompts import note_truncated

    batch_size = batch_size or cfg.sampling.batch_size
    if text is None:
        note_truncated(pipe, prompts, cfg.sampling.max_sequence_length)
    call = call_kwargs(pipe, cfg)
    out: list[Any] = []
    starts = range(0, len(prompts), batch_size)
    bar = progress(starts, desc=desc, unit="batch", leave=False, disable=desc is None)
    for i in bar:
        p, s = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        with torch.no_grad():
            result = pipe(
                **(text.kwargs(p) if text is not None else {"prompt": p}),
                generator=generators(s),
                output_type=output_type,
                **call,
            )
        out.extend(list(result.images))
    return out


def to_array(images: Sequence[Any]) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1] from PIL images or float arrays."""
    arrs = [
        np.asarray(im, dtype=np.float32) / 255.0 if isinstance(im, Image.Image) else np.asarray(im, dtype=np.float32)
        for im in images
    ]
    return np.stack(arrs)


def load_images(paths: Sequence[Path], fix: str = "delete it and re-run the stage that wrote it") -> list[Image.Image]:
    """RGB images from PNG files; an unreadable file is a one-line error naming it."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise MpqError(f"{p}: not a readable image ({type(err).__name__}); {fix}") from None
    return out


IMAGE_NAME = "[0-9][0-9][0-9][0-9].png"  # what save_images names an image: 0000.png, 0001.png, ...
IMAGES = OutputKind("image folder", (IMAGE_NAME,), lambda folder: any(p.match(IMAGE_NAME) for p in folder.iterdir()))


def save_images(images: Sequence[Image.Image], folder: Path, start: int = 0) -> list[Path]:
    paths = []
    for k, im in enumerate(images):
        path = folder / f"{start + k:04d}.png"
        write_with(path, lambda tmp, im=im: im.save(tmp, format="PNG"))
        paths.append(path)
    return paths
