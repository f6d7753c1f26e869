"""Procedural captioned shapes: the embedded model's world, deterministic from a seed.

One shape per image, anti-aliased, on a flat background. Every attribute has
a fixed vocabulary, so anyone can write prompts for the embedded model:

    a {size} {color} {shape} at the {position} on a {background} background
    a {size} {color} {shape} in the center on a {background} background

3 shapes x 6 colors x 2 sizes x 5 positions x 3 backgrounds = 540 scenes.
:data:`HELDOUT` (60 of them) never appears in training; every pair of
attribute values still does, so the held-out scenes test composition.

Rendering is a signed distance per pixel turned into coverage with a one-pixel
ramp (analytic anti-aliasing), in torch, batched; the jitter of position and
size comes from a ``torch.Generator``, so a seed fixes every image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES: dict[str, float] = {"small": 0.2, "large": 0.4}  # diameter / image side
POSITIONS: dict[str, tuple[float, float]] = {  # object center (x, y) / image side; y grows downwards
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
POSITION_JITTER = 0.025  # +- fraction of the side, uniform
SIZE_JITTER = 0.06  # +- relative, uniform
TRIANGLE_SIDE = 1.1  # an equilateral triangle's side, in diameters: about the visual size of the circle

VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
ATTRIBUTES: tuple[str, ...] = tuple(VOCAB)


@dataclass(frozen=True, order=True)
class Scene:
    """One image's attributes; its caption is the only text the embedded model was trained on."""

    shape: str
    color: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) not in VOCAB[f.name]:
                raise ValueError(f"unknown {f.name} {getattr(self, f.name)!r}; one of {', '.join(VOCAB[f.name])}")

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"

    def label(self) -> tuple[int, ...]:
        """Class index of each attribute, in :data:`ATTRIBUTES` order."""
        return tuple(VOCAB[a].index(getattr(self, a)) for a in ATTRIBUTES)


_CAPTION = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<color>\w+)\s+(?P<shape>\w+)\s+(?:at\s+the\s+(?P<position>\w+\s+\w+)|in\s+the\s+(?P<center>center))"
    r"\s+on\s+an?\s+(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of the grammar describes; ``None`` for any other text."""
    m = _CAPTION.match(text)
    if not m:
        return None
    d = {k: (v or "").lower() for k, v in m.groupdict().items()}
    d["position"] = d.pop("center") or " ".join(d["position"].split())
    try:
        return Scene(**d)
    except ValueError:
        return None


def all_scenes() -> list[Scene]:
    """The 540 scenes, in a fixed order."""
    return [Scene(s, c, z, p, b) for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS for b in BACKGROUNDS]


# Held out of training: 60 scenes, drawn once (seeded shuffle, quotas) so that every attribute value is
# held out equally often (20 per shape, 10 per color, ...) and every pair of attribute values keeps at
# least 4 training scenes; written out here so that the list never moves.
HELDOUT_CAPTIONS: tuple[str, ...] = (
    "a small red triangle at the top right on a gray background",
    "a small yellow square at the top left on a gray background",
    "a small green triangle in the center on a gray background",
    "a small blue triangle at the top left on a black background",
    "a small green circle at the bottom right on a white background",
    "a large yellow square at the bottom left on a gray background",
    "a small orange square at the bottom left on a gray background",
    "a large purple triangle at the top left on a gray background",
    "a large red square in the center on a white background",
    "a small green circle at the top right on a black background",
    "a small purple circle at the top left on a white background",
    "a large purple circle at the top left on a gray background",
    "a small red circle at the bottom right on a gray background",
    "a large purple circle at the bottom left on a gray background",
    "a small purple square in the center on a gray background",
    "a small yellow triangle at the bottom right on a gray background",
    "a large yellow square in the center on a black background",
    "a large red circle at the top left on a gray background",
    "a small orange square at the bottom left on a white background",
    "a large purple triangle in the center on a gray background",
    "a large green square at the top right on a white background",
    "a small yellow triangle at the top right on a gray background",
    "a small orange circle at the top left on a black background",
    "a small purple triangle at the top left on a gray background",
    "a small red triangle in the center on a white background",
    "a large green square at the bottom left on a gray background",
    "a large red circle in the center on a black background",
    "a large blue triangle at the top left on a gray background",
    "a small green triangle at the top left on a black background",
    "a small red square at the top right on a black background",
    "a large blue circle at the top left on a white background",
    "a large blue square in the center on a black background",
    "a small red circle at the top left on a white background",
    "a small yellow circle in the center on a black background",
    "a small green square at the bottom right on a gray background",
    "a large orange circle at the bottom right on a gray background",
    "a large red square at the bottom left on a black background",
    "a small yellow triangle at the bottom left on a white background",
    "a large blue circle at the bottom left on a gray background",
    "a large green circle at the bottom left on a black background",
    "a small green triangle in the center on a black background",
    "a small blue triangle at the bottom right on a black background",
    "a small purple square at the bottom left on a black background",
    "a large blue circle at the bottom left on a black background",
    "a small blue triangle at the top right on a black background",
    "a small orange square in the center on a black background",
    "a small orange circle at the bottom left on a white background",
    "a small yellow circle at the top right on a black background",
    "a small green square in the center on a black background",
    "a large yellow square at the top right on a black background",
    "a large red triangle at the top right on a white background",
    "a large orange triangle at the bottom right on a white background",
    "a large orange circle at the bottom right on a white background",
    "a large purple triangle at the bottom right on a white background",
    "a large yellow circle at the top right on a white background",
    "a large blue square at the bottom right on a white background",
    "a large purple triangle at the top right on a white background",
    "a large blue triangle at the bottom right on a white background",
    "a large orange square at the bottom right on a white background",
    "a large orange square at the top right on a white background",
)


@lru_cache(maxsize=1)
def heldout_scenes() -> tuple[Scene, ...]:
    scenes = tuple(parse_caption(c) for c in HELDOUT_CAPTIONS)
    assert all(s is not None for s in scenes), "a held-out caption does not parse"
    return scenes  # type: ignore[return-value]


@lru_cache(maxsize=1)
def train_scenes() -> tuple[Scene, ...]:
    held = set(heldout_scenes())
    return tuple(s for s in all_scenes() if s not in held)


def sample_scenes(n: int, generator: torch.Generator, pool: Sequence[Scene] | None = None) -> list[Scene]:
    """``n`` scenes drawn uniformly (with replacement) from ``pool`` (default: the training scenes)."""
    pool = train_scenes() if pool is None else pool
    idx = torch.randint(len(pool), (n,), generator=generator).tolist()
    return [pool[i] for i in idx]


# ------------------------------------------------------------------------------ rendering
def _rgb(table: dict[str, tuple[int, int, int]], names: Sequence[str]) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32) / 255.0


def _sdf(shape_id: torch.Tensor, px: torch.Tensor, py: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each scene's shape; px, py: offsets from its center (N, H, W)."""
    r = (d / 2)[:, None, None]
    circle = torch.sqrt(px**2 + py**2) - r
    qx, qy = px.abs() - r, py.abs() - r
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    # equilateral triangle pointing up (exact distance), its bounding box centered on the position
    h = (d * TRIANGLE_SIDE / 2)[:, None, None]  # half side
    k = math.sqrt(3.0)
    x = px.abs() - h
    y = -py + 1.5 * h / k  # y up; the bounding box center is h/(2k) above the centroid, the base h/k below it
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * h), torch.zeros_like(x))
    triangle = -torch.sqrt(x**2 + y**2) * torch.sign(y)
    return torch.where(
        shape_id[:, None, None] == 0, circle, torch.where(shape_id[:, None, None] == 1, square, triangle)
    )


def render(
    scenes: Sequence[Scene], resolution: int, generator: torch.Generator | None = None, jitter: bool = True
) -> torch.Tensor:
    """Images (N, 3, H, W), float32 in [0, 1]; position and size jitter drawn from ``generator``."""
    n = len(scenes)
    if jitter:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        dx, dy = ((torch.rand(2, n, generator=gen) * 2 - 1) * POSITION_JITTER * resolution).unbind(0)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * SIZE_JITTER
    else:
        dx = dy = torch.zeros(n)
        scale = torch.ones(n)
    cx = torch.tensor([POSITIONS[s.position][0] for s in scenes]) * resolution + dx
    cy = torch.tensor([POSITIONS[s.position][1] for s in scenes]) * resolution + dy
    d = torch.tensor([SIZES[s.size] for s in scenes]) * resolution * scale
    grid = torch.arange(resolution, dtype=torch.float32) + 0.5
    px = grid[None, None, :] - cx[:, None, None]
    py = grid[None, :, None] - cy[:, None, None]
    shape_id = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    coverage = (0.5 - _sdf(shape_id, px, py, d)).clamp(0.0, 1.0)[:, None]
    fg = _rgb(COLORS, [s.color for s in scenes])[:, :, None, None]
    bg = _rgb(BACKGROUNDS, [s.background for s in scenes])[:, :, None, None]
    return bg + (fg - bg) * coverage


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the 8-bit values a PNG would hold, back as floats in [0, 1]."""
    return torch.round(images.clamp(0, 1) * 255) / 255
