"""The one layer description (:class:`LayerInfo`), the layer groups, and the layer table.

A :class:`LayerInfo` is made once per run, at PTQ, from the quantized model
(:func:`describe`) and stored in the checkpoint's manifest; every later stage
reads it from there (:func:`mpq.calibration.checkpoint.run_layers`). Without a
run, ``mpq layers --meta`` makes the same description from the architecture
on the meta device (:func:`meta_layers`), through the same code.

Groups: a layer is *content*-related (scored by SSIM) when a pattern of
``groups.content`` matches it (default: its denoiser family's, e.g. ``attn2``
and ``ff`` for a UNet, the text stream for MMDiT), else *quality*-related (SQNR).
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mpq.runner.patterns import compile_pattern, deadline

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mpq.quant.model import QuantModel

CONTENT = "content"
QUALITY = "quality"
GROUPS = (CONTENT, QUALITY)


# ----------------------------------------------------------------------------- groups
def pattern_matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` searches the name; a plain pattern must equal one dotted part."""
    if pattern.startswith("re:"):
        return compile_pattern(pattern[3:], "groups.content pattern").search(name) is not None
    return pattern in name.split(".")


def content_patterns(cfg: DictConfig, family: str) -> list[str]:
    """``groups.content`` if set, else the denoiser family's default content group (:mod:`mpq.families`)."""
    from mpq.families import family_of

    return list(cfg.groups.content) if cfg.groups.content is not None else list(family_of(family).content)


def group_of(name: str, content_patterns: Sequence[str]) -> str:
    return CONTENT if any(pattern_matches(p, name) for p in content_patterns) else QUALITY


def assign_groups(names: Iterable[str], content_patterns: Sequence[str], warn: bool = True) -> dict[str, str]:
    """{layer: group}; warns once for each pattern that matches no layer."""
    names = list(names)
    with deadline(f"groups.content {list(content_patterns)}"):
        groups = {n: group_of(n, content_patterns) for n in names}
        unmatched = [p for p in content_patterns if not any(pattern_matches(p, n) for n in names)] if warn else []
    for p in unmatched:
        warnings.warn(f"content-group pattern '{p}' matches no layer of this model", stacklevel=2)
    return groups


# ----------------------------------------------------------------------------- the description
@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: what the quantizer, the cost model, the search and the report know of it."""

    name: str  # "model." + module path (MixDQ's names)
    kind: str  # linear | conv
    shape: tuple[int, ...]  # weight shape
    in_split: tuple[
        int, ...
    ]  # input-channel boundaries of its quantizers: (0, C_in), or (0, c, C_in) for a split input
    bos_aware: bool  # the first text token stays FP (cross-attention to_k / to_v)
    act_numel: int  # input activation elements for one sample (one denoiser call at the run's resolution)
    group: str = QUALITY  # content | quality (from groups.content)

    @property
    def weight_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def n_parts(self) -> int:
        return len(self.in_split) - 1

    @property
    def bos_numel(self) -> int:
        """Input elements per sample kept FP (the BOS token's row)."""
        return self.shape[1] if self.bos_aware else 0

    def manifest_entry(self) -> dict[str, Any]:
        """The checkpoint manifest's record (the group is the config's to decide, not the checkpoint's)."""
        d = asdict(self)
        d.pop("group")
        d["shape"], d["in_split"] = list(self.shape), list(self.in_split)
        return d

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any], group: str) -> LayerInfo:
        return cls(
            str(entry["name"]),
            str(entry["kind"]),
            tuple(entry["shape"]),
            tuple(entry["in_split"]),
            bool(entry["bos_aware"]),
            int(entry["act_numel"]),
            group,
        )


# the denoiser's numbered blocks (and the UNet's middle block), and the order the forward runs their kinds in
BLOCK = re.compile(r"^model\.((?:down_|up_|single_transformer_|transformer_)?blocks\.\d+|mid_block)\.")
STAGE = {"down_blocks": 0, "transformer_blocks": 0, "blocks": 0, "mid_block": 1, "single_transformer_blocks": 1}


def edge_layers(names: Sequence[str]) -> set[str]:
    """The layers hand rules keep at higher precision: outside any numbered block (input/output layers,
    embeddings), or in the denoiser's first or last block in the order the forward runs them (UNet: down, mid,
    up; Flux: double, single)."""
    blocks = [m[1] if (m := BLOCK.match(n)) else None for n in names]

    def order(block: str) -> tuple[int, int]:
        kind, _, index = block.rpartition(".")
        return (STAGE.get(kind, 2), int(index)) if kind else (STAGE[block], 0)

    numbered = sorted({b for b in blocks if b is not None}, key=order)
    ends = {numbered[0], numbered[-1]} if numbered else set()
    return {n for n, b in zip(names, blocks) if b is None or b in ends}


def describe(qm: QuantModel, content_patterns: Sequence[str], warn: bool = True) -> list[LayerInfo]:
    """The description of every layer of a prepared :class:`~mpq.quant.model.QuantModel`, in module order."""
    groups = assign_groups(qm.names, content_patterns, warn)
    return [
        LayerInfo(
            name,
            "linear" if layer.weight.dim() == 2 else "conv",
            tuple(layer.weight.shape),
            tuple(layer.in_split),
            bool(layer.bos_aware),
            int(layer.act_numel),
            groups[name],
        )
        for name, layer in qm.layers.items()
    ]


def meta_layers(cfg: DictConfig) -> list[LayerInfo]:
    """The layer table of the configured denoiser without weights: built on the meta device, traced once at
    ``sampling.resolution``; input splits and BOS-aware layers as ``quant.split_shortcut`` / ``quant.act.bos_aware``
    set them. A run reads the same description from its checkpoint instead."""
    from mpq.models.loader import arch_family, load_arch, meta_denoiser, meta_inputs
    from mpq.quant.model import QuantModel
    from mpq.quant.quantizer import WeightQuant
    from mpq.quant.structure import trace

    arch = load_arch(cfg)
    family = arch_family(arch)
    qm = QuantModel(meta_denoiser(arch))
    inputs = meta_inputs(arch, cfg.sampling.resolution, cfg.sampling.max_sequence_length)
    st = trace(qm.denoiser, inputs, family.first_token_constant).enabled(
        cfg.quant.split_shortcut, cfg.quant.act.bos_aware
    )
    from mpq.runner.config import weight_formats

    qm.prepare(
        list(cfg.quant.bits),
        cfg.quant.act.symmetric,
        st,
        WeightQuant.from_config(cfg.quant.weight),
        weight_formats(cfg),
    )
    return describe(qm, content_patterns(cfg, family.name))


# ----------------------------------------------------------------------------- the table
COLUMNS = ("name", "kind", "group", "weight_numel", "act_numel")


def format_table(infos: list[LayerInfo], as_csv: bool) -> str:
    rows = [[getattr(i, c) for c in COLUMNS] for i in infos]
    if as_csv:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        return buf.getvalue()
    widths = [max(len(str(x)) for x in [c] + [r[k] for r in rows]) for k, c in enumerate(COLUMNS)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(COLUMNS, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    n_content = sum(i.group == CONTENT for i in infos)
    lines.append(
        f"{len(infos)} layers: {n_content} content, {len(infos) - n_content} quality; "
        f"{sum(i.weight_numel for i in infos):,} weights"
    )
    return "\n".join(lines) + "\n"
