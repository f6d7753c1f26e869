"""Prompt lists: a text file (one prompt a line) or a list shipped with mpq (``builtin:NAME``).

Shipped lists:

* ``builtin:captions``: 80 everyday captions (the default; SDXL-Turbo and other real models);
* ``builtin:shapes``: 64 captions of the embedded model's training scenes, balanced over every
  attribute at every prefix (the first 8 cover every shape, size and background);
* ``builtin:shapes-heldout``: the 60 scenes held out of the embedded model's training.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

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


_NOTED: set[tuple[str, int]] = set()  # (prompt, limit) noted: one note a prompt and limit
_CHECKED: set[tuple[str, str, int]] = set()  # (prompt, tokenizer, limit) counted: generation calls repeat prompts


def note_truncated(pipe: Any, prompts: Sequence[str], max_sequence_length: int | None = None) -> list[str]:
    """A note (stderr, once per prompt and limit in a process) for each prompt longer than a text encoder of
    ``pipe`` reads: the tokenizer cuts it, and the image follows only its first tokens. Returns the notes."""
    notes = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None or not callable(tok):
            continue
        limit = int(getattr(tok, "model_max_length", 0) or 0)
        if name == "tokenizer_3" and max_sequence_length:
            limit = int(max_sequence_length)
        if not 0 < limit < 100_000:
            continue
        for prompt in prompts:
            if (prompt, limit) in _NOTED or (prompt, name, limit) in _CHECKED:
                continue
            _CHECKED.add((prompt, name, limit))
            n = len(tok(prompt, truncation=False, add_special_tokens=True)["input_ids"])
            if n > limit:
                _NOTED.add((prompt, limit))
                short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
                notes.append(
                    f"mpq: note: the prompt '{short}' is {n:,} tokens; {name} reads the first {limit} and ignores "
                    "the rest"
                )
    for note in notes:
        print(note, file=sys.stderr)
    return notes
