"""The layer table: every quantizable layer with its group and sizes, from the config alone."""

from __future__ import annotations

import csv
import io

from omegaconf import DictConfig

from mpq.models import load_arch, meta_denoiser
from mpq.quant.model import LayerInfo, layer_infos
from mpq.quant.structure import enabled, example_inputs, trace

COLUMNS = ("name", "kind", "group", "weight_numel", "act_numel")


def layer_table(cfg: DictConfig) -> list[LayerInfo]:
    """LayerInfo of every Linear/Conv2d of the configured denoiser, built on the meta device
    (no weights, no memory); ``act_numel`` is for one sample at ``sampling.resolution``; input splits
    and BOS-aware layers as ``quant.split_shortcut`` / ``quant.act.bos_aware`` set them."""
    arch = load_arch(cfg)
    denoiser = meta_denoiser(arch)
    st = trace(denoiser, example_inputs(arch, cfg.sampling.resolution))
    return layer_infos(denoiser, enabled(st, cfg.quant.split_shortcut, cfg.quant.act.bos_aware), list(cfg.groups.content))


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
    n_content = sum(i.group == "content" for i in infos)
    lines.append(f"{len(infos)} layers: {n_content} content, {len(infos) - n_content} quality; "
                 f"{sum(i.weight_numel for i in infos):,} weights")
    return "\n".join(lines) + "\n"
