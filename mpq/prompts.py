"""Prompt lists: a text file (one prompt a line) or a list shipped with mpq (``builtin:NAME``).

Shipped lists:

* ``builtin:captions``: 80 everyday captions (the default; SDXL-Turbo and other real models);
* ``builtin:shapes``: 64 captions of the embedded model's training scenes, balanced over every
  attribute at every prefix (the first 8 cover every shape, size and background);
* ``builtin:shapes-heldout``: the 60 scenes held out of the embedded model's training.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mpq.errors import MpqError

BUILTIN_PREFIX = "builtin:"


def _file_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_lists() -> dict[str, list[str]]:
    from mpq.shapes.data import HELDOUT_CAPTIONS

    data = resources.files("mpq.data")
    return {
        "captions": _file_lines(data.joinpath("prompts.txt").read_text()),
        "shapes": _file_lines(data.joinpath("shapes_prompts.txt").read_text()),
        "shapes-heldout": list(HELDOUT_CAPTIONS),
    }


def read_prompts(spec: str | None, key: str = "calib.prompts_file") -> list[str]:
    """The prompts named by ``spec`` (``None``: ``builtin:captions``); errors name the config ``key``."""
    spec = spec or BUILTIN_PREFIX + "captions"
    if spec.startswith(BUILTIN_PREFIX):
        lists = builtin_lists()
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in lists:
            raise MpqError(
                f"{key}={spec}: no such shipped prompt list; use one of {', '.join(BUILTIN_PREFIX + n for n in lists)} "
                "or a file path"
            )
        return lists[name]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MpqError(f"{key}={path} does not exist; give a text file with one prompt a line, or a builtin: list")
    try:
        prompts = _file_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MpqError(f"{key}={path} is not a UTF-8 text file (one prompt a line); save it as UTF-8") from None
    if not prompts:
        raise MpqError(f"{key}={path} has no prompts")
    return prompts


def cycle(prompts: list[str], n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` prompts (cycled if the list is shorter) and their seeds ``seed + i``."""
    return [prompts[i % len(prompts)] for i in range(n)], [seed + i for i in range(n)]
