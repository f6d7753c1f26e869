"""Layer groups: content-related (scored by SSIM) vs quality-related (SQNR)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

CONTENT = "content"
QUALITY = "quality"


def pattern_matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` searches the name; a plain pattern must equal one dotted part."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern in name.split(".")


def group_of(name: str, content_patterns: Sequence[str]) -> str:
    return CONTENT if any(pattern_matches(p, name) for p in content_patterns) else QUALITY


def assign_groups(names: Iterable[str], content_patterns: Sequence[str], warn: bool = True) -> dict[str, str]:
    """{layer: group}; warns once for each pattern that matches no layer."""
    names = list(names)
    groups = {n: group_of(n, content_patterns) for n in names}
    if warn:
        for p in content_patterns:
            if not any(pattern_matches(p, n) for n in names):
                warnings.warn(f"content-group pattern '{p}' matches no layer of this model", stacklevel=2)
    return groups
