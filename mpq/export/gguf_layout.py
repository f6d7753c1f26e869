"""The original checkpoint layout of a diffusers denoiser: the tensor names GGUF runtimes read.

ComfyUI-GGUF and stable-diffusion.cpp read a denoiser in the layout its authors published (Stability's ``ldm``
UNet, SD3's MMDiT, Black Forest Labs' Flux), and diffusers' ``from_single_file`` converts that layout back with its
own converters. This module is the inverse of those converters: each original tensor is named with the diffusers
parameters it is made of, concatenated along the output dimension (SD3's and Flux's fused ``qkv``, Flux's
single-block ``linear1``), with the shift/scale halves swapped where the original AdaLN order differs. Rows are
never split, so a row-wise (block-wise) quantized tensor is the concatenation of its parts' quantized rows.

:func:`check_roundtrip` runs diffusers' own converter on a layout and demands every parameter back unchanged, so a
layout is proved by the runtime's converter, not by this module. Pure: names and shapes in, names out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpq.errors import MpqError

UNET_PREFIX = "model.diffusion_model."  # diffusers' UNet converter reads only keys under it


@dataclass(frozen=True)
class Original:
    """One tensor of the original layout: ``parts`` (diffusers parameter names) concatenated along dim 0, then the
    two halves swapped when ``swap`` (original AdaLN order shift, scale; diffusers' scale, shift)."""

    name: str
    parts: tuple[str, ...]
    swap: bool = False

    @property
    def layers(self) -> tuple[str, ...]:
        """The module paths whose weights this tensor holds (none for a bias or buffer)."""
        return tuple(p[: -len(".weight")] for p in self.parts if p.endswith(".weight"))

    def shape(self, params: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        first = tuple(params[self.parts[0]].shape)
        return (sum(int(params[p].shape[0]) for p in self.parts), *first[1:])

    def tensor(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        t = torch.cat([params[p] for p in self.parts]) if len(self.parts) > 1 else params[self.parts[0]]
        return swapped(t) if self.swap else t


def swapped(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


# ------------------------------------------------------------------------------ UNet (ldm)
_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + (f".{tail}" if tail else "")


def _unet_name(key: str, per: int, attention_up: Sequence[bool]) -> str:
    """The ldm name of one diffusers UNet parameter (``per`` = layers_per_block + 1)."""
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * per + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.{2 * j + 1}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * per + j
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * per + per - 1}.{2 if attention_up[b] else 1}.conv.{m[2]}"
    raise MpqError(f"UNet parameter '{key}' has no place in the original (ldm) layout")


def unet_layout(keys: Sequence[str], config: Mapping[str, Any]) -> list[Original]:
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise MpqError("a UNet with a layers_per_block per block has no single original layout; export --format mpq")
    attention_up = ["CrossAttn" in t for t in config["up_block_types"]]
    return [Original(UNET_PREFIX + _unet_name(k, per + 1, attention_up), (k,)) for k in keys]


# ------------------------------------------------------------------------------ MMDiT (SD3) and Flux
def _renamed(keys: Sequence[str], table: Sequence[tuple[str, str]]) -> list[Original]:
    """Rules ``(diffusers regex, original template)`` over the parameters. ``name=part|part|...``: the parts (all must
    exist) are concatenated into ``name``; ``~`` in front swaps the halves."""
    out: dict[str, Original] = {}
    taken: set[str] = set()
    keyset = set(keys)
    for key in keys:
        for pattern, template in table:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            swap = template.startswith("~")
            name, _, fused = template.lstrip("~").partition("=")
            parts = tuple(m.expand(p) for p in fused.split("|")) if fused else (key,)
            if all(p in keyset for p in parts):
                out[m.expand(name)] = Original(m.expand(name), parts, swap)
                taken.update(parts)
            break
    left = [k for k in keys if k not in taken]
    if left:
        raise MpqError(f"parameter '{left[0]}' has no place in the original layout ({len(left)} such)")
    return list(out.values())


_B = r"transformer_blocks.\1."
_SD3 = (
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"pos_embed\.proj\.(weight|bias)", r"x_embedder.proj.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"t_embedder.mlp.0.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"t_embedder.mlp.2.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"y_embedder.mlp.0.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"y_embedder.mlp.2.\1"),
    (r"context_embedder\.(weight|bias)", r"context_embedder.\1"),
    (
        r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)",
        rf"joint_blocks.\1.x_block.attn.qkv.\2={_B}attn.to_q.\2|{_B}attn.to_k.\2|{_B}attn.to_v.\2",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(weight|bias)",
        rf"joint_blocks.\1.context_block.attn.qkv.\2={_B}attn.add_q_proj.\2|{_B}attn.add_k_proj.\2|{_B}attn.add_v_proj.\2",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn2\.to_q\.(weight|bias)",
        rf"joint_blocks.\1.x_block.attn2.qkv.\2={_B}attn2.to_q.\2|{_B}attn2.to_k.\2|{_B}attn2.to_v.\2",
    ),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"joint_blocks.\1.x_block.attn2.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"joint_blocks.\1.context_block.attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc1.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"joint_blocks.\1.x_block.mlp.fc2.\2"),
    (
        r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)",
        r"joint_blocks.\1.context_block.mlp.fc1.\2",
    ),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"joint_blocks.\1.context_block.mlp.fc2.\2"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
    (r"norm_out\.linear\.(weight|bias)", r"~final_layer.adaLN_modulation.1.\1"),
)


def sd3_layout(keys: Sequence[str], config: Mapping[str, Any]) -> list[Original]:
    last = int(config["num_layers"]) - 1
    context = (  # the last block's context AdaLN has only shift and scale, in the original order (swapped)
        (
            rf"transformer_blocks\.({last})\.norm1_context\.linear\.(weight|bias)",
            r"~joint_blocks.\1.context_block.adaLN_modulation.1.\2",
        ),
        (
            r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)",
            r"joint_blocks.\1.context_block.adaLN_modulation.1.\2",
        ),
    )
    return _renamed(keys, [*_SD3, *context])


_FLUX = (
    (r"time_text_embed\.timestep_embedder\.linear_1\.(weight|bias)", r"time_in.in_layer.\1"),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(weight|bias)", r"time_in.out_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_1\.(weight|bias)", r"vector_in.in_layer.\1"),
    (r"time_text_embed\.text_embedder\.linear_2\.(weight|bias)", r"vector_in.out_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(weight|bias)", r"guidance_in.in_layer.\1"),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(weight|bias)", r"guidance_in.out_layer.\1"),
    (r"context_embedder\.(weight|bias)", r"txt_in.\1"),
    (r"x_embedder\.(weight|bias)", r"img_in.\1"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(weight|bias)", r"double_blocks.\1.img_mod.lin.\2"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(weight|bias)", r"double_blocks.\1.txt_mod.lin.\2"),
    (
        r"transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)",
        r"double_blocks.\1.img_attn.qkv.\2=transformer_blocks.\1.attn.to_q.\2|transformer_blocks.\1.attn.to_k.\2|"
        r"transformer_blocks.\1.attn.to_v.\2",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(weight|bias)",
        r"double_blocks.\1.txt_attn.qkv.\2=transformer_blocks.\1.attn.add_q_proj.\2|"
        r"transformer_blocks.\1.attn.add_k_proj.\2|transformer_blocks.\1.attn.add_v_proj.\2",
    ),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.img_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"double_blocks.\1.img_mlp.2.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(weight|bias)", r"double_blocks.\1.txt_mlp.0.\2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(weight|bias)", r"double_blocks.\1.txt_mlp.2.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"double_blocks.\1.img_attn.proj.\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(weight|bias)", r"double_blocks.\1.txt_attn.proj.\2"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(weight|bias)", r"single_blocks.\1.modulation.lin.\2"),
    (
        r"single_transformer_blocks\.(\d+)\.attn\.to_q\.(weight|bias)",
        r"single_blocks.\1.linear1.\2=single_transformer_blocks.\1.attn.to_q.\2|"
        r"single_transformer_blocks.\1.attn.to_k.\2|single_transformer_blocks.\1.attn.to_v.\2|"
        r"single_transformer_blocks.\1.proj_mlp.\2",
    ),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(weight|bias)", r"single_blocks.\1.linear2.\2"),
    (r"proj_out\.(weight|bias)", r"final_layer.linear.\1"),
    (r"norm_out\.linear\.(weight|bias)", r"~final_layer.adaLN_modulation.1.\1"),
)


def flux_layout(keys: Sequence[str], config: Mapping[str, Any]) -> list[Original]:
    return _renamed(keys, _FLUX)


LAYOUTS: dict[str, Callable[[Sequence[str], Mapping[str, Any]], list[Original]]] = {
    "unet": unet_layout,
    "sd3": sd3_layout,
    "flux": flux_layout,
}


def architecture(family: str, config: Mapping[str, Any]) -> str:
    """GGUF's ``general.architecture`` as ComfyUI-GGUF names the model (``sdxl``, ``sd1``, ``sd3``, ``flux``)."""
    if family == "unet":
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd1"
    return family


def require_layout(family: str) -> None:
    """A one-line error for a family GGUF runtimes have no single-file layout for (PixArt)."""
    if family not in LAYOUTS:
        have = ", ".join(sorted(LAYOUTS))
        raise MpqError(
            f"the {family} family has no original single-file layout that GGUF runtimes read (they read {have}); "
            "export it with --format mpq or --format sdnq"
        )


def layout(family: str, keys: Sequence[str], config: Mapping[str, Any]) -> list[Original]:
    """The original layout of a denoiser of ``family`` with parameters ``keys``; every key used exactly once."""
    require_layout(family)
    out = LAYOUTS[family](list(keys), config)
    used = [p for o in out for p in o.parts]
    if sorted(used) != sorted(keys):
        left = sorted(set(keys) - set(used))
        raise MpqError(f"the original layout leaves out {len(left)} parameters (first: {left[:1]})")
    return out


def fused_layers(originals: Sequence[Original]) -> list[tuple[str, ...]]:
    """Layers (module paths) whose weights are one tensor of the original layout: a file stores them in one type."""
    return [o.layers for o in originals if len(o.layers) > 1]


def check_roundtrip(
    family: str, originals: Sequence[Original], params: Mapping[str, torch.Tensor], config: Any
) -> None:
    """Run diffusers' own single-file converter over the layout: every parameter must come back unchanged."""
    from diffusers.loaders import single_file_utils as sfu

    convert = {
        "unet": sfu.convert_ldm_unet_checkpoint,
        "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
        "flux": sfu.convert_flux_transformer_checkpoint_to_diffusers,
    }[family]
    back = convert({o.name: o.tensor(params) for o in originals}, config=dict(config))
    wrong = sorted(k for k in params if k not in back or not torch.equal(back[k], params[k]))
    extra = sorted(set(back) - set(params))
    if wrong or extra:
        raise MpqError(
            f"diffusers' converter does not give this {family} denoiser back from its original layout "
            f"({len(wrong)} parameters differ or are missing, first {wrong[:1]}; {len(extra)} unknown, {extra[:1]})"
        )
