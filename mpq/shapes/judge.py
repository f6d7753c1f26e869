"""Prompt adherence for the embedded model: a small classifier reads each attribute back.

``ShapeJudge`` is a CNN with one head per attribute (shape, color, size,
position, background), trained on rendered images of :mod:`mpq.shapes.data`
with blur, noise and color-gain augmentation (so that it judges generated
images, not only perfect renders); its weights ship beside the embedded model.

``adherence(images, prompts)`` is the fraction of images whose every
attribute, as the judge reads it, matches the prompt, plus the fraction per
attribute. Prompts outside the shapes grammar have no adherence (``None``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import MpqError
from mpq.shapes.data import ATTRIBUTES, VOCAB, parse_caption

JUDGE_RESOLUTION = 128
JUDGE_FILE = Path(__file__).resolve().parent.parent / "models" / "weights" / "shapes-judge.safetensors"


class ShapeJudge(nn.Module):
    """Four stride-2 convolutions (128 px -> 8x8 x 64), a shared 128-unit layer, one linear head per attribute."""

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        side = JUDGE_RESOLUTION // 16
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(VOCAB[a])) for a in ATTRIBUTES})
        self.config = {"width": width, "hidden": hidden}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for (N, 3, H, W) images in [0, 1] (resized to 128 px if needed)."""
        if images.shape[-1] != JUDGE_RESOLUTION or images.shape[-2] != JUDGE_RESOLUTION:
            images = F.interpolate(
                images, size=(JUDGE_RESOLUTION, JUDGE_RESOLUTION), mode="bilinear", antialias=True, align_corners=False
            )
        h = self.fc(self.features(images * 2 - 1))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class index per attribute, (N,) each."""
        outs: dict[str, list[torch.Tensor]] = {a: [] for a in ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            for a, logits in self(images[i : i + batch_size]).items():
                outs[a].append(logits.argmax(-1))
        return {a: torch.cat(v) for a, v in outs.items()}


def save_judge(judge: ShapeJudge, path: str | Path, metrics: dict[str, Any] | None = None) -> None:
    from mpq.runner.files import save_tensors

    meta = {
        "mpq_judge": json.dumps(
            {"config": judge.config, "attributes": {a: list(VOCAB[a]) for a in ATTRIBUTES}, "metrics": metrics or {}}
        )
    }
    save_tensors(path, judge.state_dict(), metadata=meta)


def load_judge(path: str | Path = JUDGE_FILE) -> ShapeJudge:
    from mpq.runner.files import load_tensors, read_tensor_metadata

    meta = read_tensor_metadata(path)
    if "mpq_judge" not in meta:
        raise MpqError(
            f"{path} is not an mpq shapes judge (no mpq_judge metadata); re-run `python scripts/train_tiny.py`"
        )
    info = json.loads(meta["mpq_judge"])
    if info["attributes"] != {a: list(VOCAB[a]) for a in ATTRIBUTES}:
        raise MpqError(f"{path} was trained for another shapes vocabulary; re-run `python scripts/train_tiny.py`")
    judge = ShapeJudge(**info["config"])
    judge.load_state_dict(load_tensors(path))
    return judge.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def shipped_judge() -> ShapeJudge:
    if not JUDGE_FILE.is_file():
        raise MpqError(
            f"the shapes judge {JUDGE_FILE} is missing from the package; reinstall mpq or run `python "
            "scripts/train_tiny.py`"
        )
    return load_judge(JUDGE_FILE)


def _as_tensor(images: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float32 in [0, 1] from PIL images, (N, H, W, 3) arrays in [0, 1], or such a tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def adherence(
    images: Sequence[Any] | np.ndarray | torch.Tensor, prompts: Sequence[str], judge: ShapeJudge | None = None
) -> dict[str, Any] | None:
    """{"all": fraction with every attribute right, <attribute>: fraction right, "n": images, "per_image": [bool]};
    ``None`` when a prompt is not of the shapes grammar."""
    scenes = [parse_caption(p) for p in prompts]
    if not scenes or any(s is None for s in scenes):
        return None
    judge = judge or shipped_judge()
    preds = judge.predict(_as_tensor(images))
    truth = torch.tensor([s.label() for s in scenes])  # type: ignore[union-attr]
    right = torch.stack([preds[a] == truth[:, k] for k, a in enumerate(ATTRIBUTES)], dim=1)
    out: dict[str, Any] = {"all": float(right.all(dim=1).float().mean()), "n": len(scenes)}
    out.update({a: float(right[:, k].float().mean()) for k, a in enumerate(ATTRIBUTES)})
    out["per_image"] = right.all(dim=1).tolist()
    return out
