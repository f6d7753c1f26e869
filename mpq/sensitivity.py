"""Metric-decoupled sensitivity: each layer quantized alone, each candidate bit.

* SQNR (dB) of the denoiser output against the recorded FP output, over the
  whole calibration set: every layer (MixDQ's SQNR file covers all layers;
  the search uses it for the quality group).
* SSIM of the generated image against the FP reference image (same prompt and
  seed), averaged over ``sensitivity.num_images`` images: the content group.

Both are sums accumulated in float64 over batches in a fixed order (SQNR:
sum ref^2 and sum err^2; SSIM: sum of per-image SSIM and count), so neither
chunking for memory nor a kill-and-resume changes a single digit.

``method=fast`` reuses the FP computation preceding the quantized layer
(:class:`mpq.prefix_cache.PrefixCache`) and the text embeddings; it computes
the same numbers as ``naive`` (one full forward per layer x bit x batch).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mpq import distributed
from mpq.calib import CalibData, calib_prompts
from mpq.errors import MpqError
from mpq.files import read_json, read_yaml, write_json, write_yaml
from mpq.generate import generators, to_array
from mpq.groups import CONTENT, assign_groups
from mpq.infer import quantized_pipeline
from mpq.metrics import SqnrAccumulator, image_ssim, sqnr, sqnr_db
from mpq.models import torch_dtype
from mpq.prefix_cache import PrefixCache, repeat_batch
from mpq.progress import progress
from mpq.quant.model import PREFIX, QuantModel
from mpq.rundir import RunDir

KINDS = ("weight", "act")


def result_path(run: RunDir, kind: str, metric: str) -> Path:
    return run.root / "sensitivity" / f"{kind}_{metric}.yaml"


def _partial_path(run: RunDir, kind: str, metric: str, rank: int | None = None) -> Path:
    """A process's partial results (``rank``: one rank of a distributed job, its own file)."""
    tail = "" if rank is None else f".rank{rank}"
    return run.root / "sensitivity" / f".{kind}_{metric}.partial{tail}.json"


def _partial_files(run: RunDir, kind: str, metric: str) -> list[Path]:
    """Every partial file of ``kind``/``metric``: one process's, or each rank's of a distributed job."""
    return sorted((run.root / "sensitivity").glob(f".{kind}_{metric}.partial*.json"))


def load_partials(files: list[Path], sig: str) -> tuple[set[tuple[int, str]], dict[str, list[list[float]]]]:
    """(done, sums) merged from partial files with signature ``sig``: per layer, the file that got furthest
    (a layer's sums and done batches always come from one file, so resuming continues them exactly)."""
    best: dict[str, tuple[list[int], list[list[float]]]] = {}
    for f in files:
        try:
            state = read_json(f)
        except MpqError:
            continue  # a damaged partial file (writes are atomic, so only by hand): its layers start over
        if not isinstance(state, dict) or state.get("signature") != sig:
            continue
        batches: dict[str, list[int]] = {}
        for k, name in state.get("done", []):
            batches.setdefault(name, []).append(int(k))
        for name, ks in batches.items():
            if name in state.get("sums", {}) and len(ks) > len(best.get(name, ([], []))[0]):
                best[name] = (ks, state["sums"][name])
    done = {(k, name) for name, (ks, _) in best.items() for k in ks}
    return done, {name: sums for name, (_, sums) in best.items()}


def _signature(cfg: DictConfig, run: RunDir, kind: str, metric: str, bits: list[int]) -> str:
    """What the numbers depend on: a partial file with another signature is discarded."""
    keys = {"kind": kind, "metric": metric, "bits": bits, "ckpt": run.ckpt.stat().st_size,
            "ckpt_mtime": run.ckpt.stat().st_mtime_ns, "sens": OmegaConf.to_container(cfg.sensitivity),
            "sampling": OmegaConf.to_container(cfg.sampling)}
    keys["sens"].pop("method")  # fast and naive give the same numbers
    keys["sens"].pop("save_every_s")
    keys["sens"].pop("cache_budget_mb")
    keys["sens"].pop("share_bits")
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ metrics
class Metric:
    """One sensitivity metric over its batches. ``run_fp(k)`` runs batch k in FP (recorded by the prefix
    cache in fast mode) and keeps its output as the reference; ``scores(k, tile)`` gives the float64 sums
    (a, b) of batch k for each of ``tile`` bit copies run together; ``value(a, b)`` is the metric. The
    reference is the FP pass of this same pipeline, in ``sensitivity.dtype``, on the same batches: scores
    depend on the calibration inputs and that model alone, not on the dtype the run generates in."""

    name = ""
    group: str | None = None  # the layers it scores (None: every layer)

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig, run: RunDir | None, fast: bool) -> None:
        self.pipe, self.qm, self.cfg, self.fast = pipe, qm, cfg, fast
        self.device = next(qm.denoiser.parameters()).device
        self.refs: dict[int, Any] = {}
        self.batches: list[Any] = []

    def run_fp(self, k: int) -> None:
        raise NotImplementedError

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        raise NotImplementedError

    @staticmethod
    def value(a: float, b: float) -> float:
        raise NotImplementedError


class Sqnr(Metric):
    """SQNR (dB) of the denoiser output over the calibration set: sums of ref^2 and err^2."""

    name = "sqnr"

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig, run: RunDir | None, fast: bool, calib: CalibData | None = None) -> None:
        super().__init__(pipe, qm, cfg, run, fast)
        dtype = next(qm.denoiser.parameters()).dtype
        calib = calib if calib is not None else CalibData.open(run)  # type: ignore[arg-type]
        pairs = list(calib.batches(cfg.sensitivity.batch_size, self.device, dtype))
        self.batches = [kwargs for kwargs, _ in pairs]
        self.recorded = [out for _, out in pairs]  # the calibration run's outputs, in its dtype (the float floor)

    def run_fp(self, k: int) -> None:
        with torch.no_grad():
            self.refs[k] = self.qm(**self.batches[k], return_dict=False)[0]

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        with torch.no_grad():
            out = self.qm(**repeat_batch(self.batches[k], tile), return_dict=False)[0]
        r = self.refs[k].double()
        return [(float(r.pow(2).sum()), float((o.double() - r).pow(2).sum())) for o in out.chunk(tile)]

    @staticmethod
    def value(a: float, b: float) -> float:
        return sqnr_db(a, b)

    def float_floor_db(self) -> float:
        """SQNR (dB) of the calibration run's FP output (its dtype) against this pass's FP output."""
        acc = SqnrAccumulator()
        for k, rec in enumerate(self.recorded):
            acc.update(rec, self.refs[k])
        return acc.value


class Ssim(Metric):
    """SSIM (``sensitivity.ssim``) of generated images against FP images of the same prompts and seeds."""

    name = "ssim"
    group = CONTENT

    def __init__(self, pipe: Any, qm: QuantModel, cfg: DictConfig, run: RunDir, fast: bool) -> None:
        super().__init__(pipe, qm, cfg, run, fast)
        prompts, seeds = calib_prompts(run)
        n = min(cfg.sensitivity.num_images, len(prompts))
        bs = cfg.sampling.batch_size
        self.batches = [(prompts[i : i + bs], seeds[i : i + bs]) for i in range(0, n, bs)]
        self._embeds: dict[int, dict[str, torch.Tensor]] = {}
        self._cached_text = fast and hasattr(pipe, "encode_prompt") and "pooled_prompt_embeds" in inspect.signature(pipe.__call__).parameters

    def _generate(self, k: int, tile: int = 1) -> np.ndarray:
        """Images of batch ``k``; ``tile`` > 1 generates the batch ``tile`` times in one pipeline call."""
        prompts, seeds = self.batches[k]
        c = self.cfg.sampling
        kwargs: dict[str, Any] = {"num_inference_steps": c.steps, "guidance_scale": c.guidance_scale, "height": c.resolution,
                                  "width": c.resolution, "generator": generators(list(seeds) * tile), "output_type": "pil"}
        if self._cached_text:  # the text encoders are not quantized: encode each batch's prompts once
            if k not in self._embeds:
                with torch.no_grad():
                    pe, npe, ppe, nppe = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=c.guidance_scale > 1.0)
                self._embeds[k] = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
                if c.guidance_scale > 1.0:
                    self._embeds[k].update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
            kwargs.update({key: repeat_batch(t, tile) for key, t in self._embeds[k].items()})
        else:
            kwargs["prompt"] = list(prompts) * tile
        with torch.no_grad():
            return to_array(self.pipe(**kwargs).images)

    def run_fp(self, k: int) -> None:
        self.refs[k] = self._generate(k)

    def scores(self, k: int, tile: int = 1) -> list[tuple[float, float]]:
        ref = self.refs[k]
        images = self._generate(k, tile)
        res = []
        for j in range(tile):
            vals = image_ssim(images[j * len(ref) : (j + 1) * len(ref)], ref, self.cfg.sensitivity.ssim)
            res.append((float(vals.astype(np.float64).sum()), float(len(vals))))
        return res

    @staticmethod
    def value(a: float, b: float) -> float:
        return a / b


METRIC_TYPES: dict[str, type[Metric]] = {m.name: m for m in (Sqnr, Ssim)}
METRICS = tuple(METRIC_TYPES)


def share_bits(setting: str, metric: str) -> bool:
    """Whether the fast path batches the candidate bits of a layer into one pass (see the config)."""
    if setting == "auto":
        return metric == "ssim"
    return setting == "always"


# ------------------------------------------------------------------------------ the stage
def layer_names_for(qm: QuantModel, cfg: DictConfig, metric: type[Metric]) -> list[str]:
    """The layers ``metric`` scores (SQNR: all; SSIM: the content group), in module order."""
    groups = assign_groups(qm.names, list(cfg.groups.content), warn=False)
    names = [n for n in qm.names if metric.group is None or groups[n] == metric.group]
    patterns = list(cfg.sensitivity.layers)
    if patterns:
        names = [n for n in names if any(fnmatchcase(n, p) or fnmatchcase(n[len(PREFIX):], p) for p in patterns)]
        if not names and metric.group is None:
            raise MpqError(f"sensitivity.layers={patterns} matches no layer; see `mpq layers --config ...` for the names")
    return names


def score_layers(qm: QuantModel, work: Metric, names: list[str], bits: list[int], kind: str, fast: bool = True, share: bool = False,
                 cache_budget_bytes: float = float("inf"), done: set[tuple[int, str]] | None = None,
                 sums: dict[str, list[list[float]]] | None = None, after_layer: Callable[[], None] | None = None,
                 bar: Any = None) -> dict[str, list[float]]:
    """The sensitivity loop: each layer in ``names`` quantized alone (``kind``: its weights or its input
    activations) at each of ``bits``, scored by ``work`` on each of its batches. ``done`` (batch, layer) items
    are skipped and ``sums`` accumulated into (float64, in a fixed order): a resumed loop ends with the same
    numbers. ``fast``: the FP prefix cache (exact); ``share``: all bits of a layer in one tiled pass."""
    done = set() if done is None else done
    sums = {} if sums is None else sums
    cache = PrefixCache(qm.denoiser) if fast else None
    try:
        qm.set_fp()
        for chunk in _chunks(work, cache, len(work.batches), cache_budget_bytes, done, names):
            for name in names:
                todo = [k for k in chunk if (k, name) not in done]
                if not todo:
                    continue
                layer = qm.layers[name]
                acc = sums.setdefault(name, [[0.0, 0.0] for _ in bits])
                if cache is not None and share:  # all candidate bits in one pass: batch copy j at bits[j]
                    layer.set_multi(kind, bits)
                    cache.replay(name[len(PREFIX):], tile=len(bits))
                    for k in todo:
                        for bi, (a, c) in enumerate(work.scores(k, len(bits))):
                            acc[bi][0] += a
                            acc[bi][1] += c
                    cache.off()
                    layer.set_multi(None)
                else:
                    for bi, b in enumerate(bits):
                        layer.set_bits(b if kind == "weight" else None, b if kind == "act" else None)
                        if cache is not None:
                            cache.replay(name[len(PREFIX):])
                        for k in todo:
                            a, c = work.scores(k)[0]
                            acc[bi][0] += a
                            acc[bi][1] += c
                        if cache is not None:
                            cache.off()
                    layer.set_bits(None, None)
                done.update((k, name) for k in todo)
                if bar is not None:
                    bar.update(len(todo))
                if after_layer is not None:
                    after_layer()
    finally:
        qm.set_fp()
        for layer in qm.layers.values():
            layer.set_multi(None)
        if cache is not None:
            cache.close()
    return {name: [work.value(*sums[name][i]) for i in range(len(bits))] for name in names if name in sums}


def compute_sensitivity(
    cfg: DictConfig,
    run: RunDir,
    kind: str,
    metric: str,
    method: str | None = None,
    pipe: Any | None = None,
    show: bool = True,
    write: bool = True,
    force: bool = False,
) -> dict[str, list[float]]:
    """{layer: [metric at each candidate bit]}; resumable through a partial file when ``write``. A file already
    made with the same settings (its signature beside it) is read back, not computed again, unless ``force``."""
    if kind not in KINDS or metric not in METRIC_TYPES:
        raise MpqError(f"sensitivity type must be {'|'.join(KINDS)} and metric {'|'.join(METRIC_TYPES)} (got {kind}, {metric})")
    pipe, qm, manifest = quantized_pipeline(cfg, run, pipe, dtype=torch_dtype(cfg.sensitivity.dtype))
    bits: list[int] = list(manifest["bits"])
    names = layer_names_for(qm, cfg, METRIC_TYPES[metric])
    if not names and cfg.sensitivity.layers:  # a partial run without content layers: an empty SSIM file
        if write:
            write_yaml(result_path(run, kind, metric), {})
        return {}
    if not names:
        raise MpqError(f"no layer is in the content group (patterns {list(cfg.groups.content)}); the SSIM file would be empty")
    sig = _signature(cfg, run, kind, metric, bits)
    d = distributed.current()
    done_marker = run.root / "sensitivity" / f".{kind}_{metric}.done.json"
    made_as = {"signature": sig, "layers": hashlib.sha256("|".join(names).encode()).hexdigest()[:16]}  # groups change the SSIM layers
    if write and not force and result_path(run, kind, metric).is_file() and done_marker.is_file():
        try:
            finished = read_json(done_marker) == made_as
        except MpqError:
            finished = False
        if finished:
            if d.is_main:
                print(f"[sensitivity] {kind} {metric}: already made with these settings ({result_path(run, kind, metric)})", flush=True)
            return {k: list(v) for k, v in read_yaml(result_path(run, kind, metric)).items()}
    fast = (method or cfg.sensitivity.method) == "fast"
    work = METRIC_TYPES[metric](pipe, qm, cfg, run, fast)
    share = fast and share_bits(cfg.sensitivity.share_bits, metric)
    mine = names
    if d.enabled:  # this rank's layers, by estimated cost (a layer's numbers do not depend on which rank runs it)
        est = d.broadcast(layer_costs(qm, run, names, metric, fast, len(bits)) if d.is_main else None)
        owner = distributed.assign(est, d.world)
        mine = [n for n in names if owner[n] == d.rank]
    partial = _partial_path(run, kind, metric, d.rank if d.enabled else None)
    done, sums = load_partials(_partial_files(run, kind, metric), sig) if write else (set(), {})
    if done and d.is_main:
        print(f"[sensitivity] {kind} {metric}: resuming, {len(done)} of {len(work.batches) * len(names)} layer-batch items already done",
              flush=True)
    done = {(k, n) for k, n in done if n in mine}
    sums = {n: v for n, v in sums.items() if n in mine}
    last_save = [time.monotonic()]

    def save(force: bool = False) -> None:
        if write and (force or time.monotonic() - last_save[0] >= cfg.sensitivity.save_every_s):
            write_json(partial, {"signature": sig, "done": sorted(done), "sums": sums})
            last_save[0] = time.monotonic()

    bar = progress(total=len(work.batches) * len(mine), initial=len(done), unit="layer", disable=not show or not d.is_main,
                   desc=f"{d.tag()}sensitivity {kind} {metric} ({'fast' if fast else 'naive'})")
    t0 = time.perf_counter()
    try:
        result = score_layers(qm, work, mine, bits, kind, fast, share, cfg.sensitivity.cache_budget_mb * 2**20, done, sums, save, bar)
    finally:
        bar.close()
    busy = time.perf_counter() - t0
    if d.enabled:
        save(force=True)  # this rank's share is complete on disk before rank 0 merges
        merged, report = d.collect(result, busy, owner, est)
        result = {n: merged[n] for n in names if n in merged}
        if report is None:  # not rank 0: rank 0 writes the merged file, then every rank goes on
            d.barrier()
            return result
        _write_distributed(run, f"{kind}_{metric}", report)
        print(f"[sensitivity] {kind} {metric} over {d.world} ranks: {distributed.load_line(report, 'layers')}", flush=True)
    if write:
        if isinstance(work, Sqnr):
            floor = float_floor(cfg, work)
            write_json(run.root / "sensitivity" / "float_floor.json", floor)
            warning = inseparable(result, floor["sensitivity_floor_db"])
            if warning:
                print(f"[sensitivity] warning: {kind} {metric}: {warning}", flush=True)
        write_yaml(result_path(run, kind, metric), {n: [round(v, 6) if math.isfinite(v) else v for v in vals] for n, vals in result.items()})
        write_json(done_marker, made_as)
        for f in _partial_files(run, kind, metric):
            f.unlink(missing_ok=True)
    d.barrier()
    return result


def _write_distributed(run: RunDir, key: str, report: list[dict[str, float]]) -> None:
    path = run.root / "sensitivity" / "distributed.json"
    try:
        data = read_json(path) if path.is_file() else {}
    except MpqError:
        data = {}
    data[key] = report
    write_json(path, data)


def execution_macs(qm: QuantModel, kwargs: dict[str, Any]) -> dict[str, float]:
    """Multiply-accumulates of each quantizable layer in one denoiser call on ``kwargs``, in the order the
    layers first run."""
    macs: dict[str, float] = {}

    def count(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, out: torch.Tensor) -> None:
            macs.setdefault(name, float(out.numel() * module.weight[0].numel()))
        return hook

    hooks = [layer.register_forward_hook(count(name)) for name, layer in qm.layers.items()]
    try:
        with torch.no_grad():
            qm(**kwargs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_costs(qm: QuantModel, run: RunDir, names: list[str], metric: str, fast: bool, n_bits: int) -> dict[str, float]:
    """Estimated cost of scoring each layer (relative): with the prefix cache, the network after the layer
    (its multiply-accumulates, in execution order) runs for each bit; naive, all of it; SSIM adds the rest of
    the pipeline (taken as one more denoiser's worth: VAE decode, SSIM)."""
    device = next(qm.denoiser.parameters()).device
    dtype = next(qm.denoiser.parameters()).dtype
    kwargs = next(iter(CalibData.open(run).batches(1, device, dtype)))[0]
    macs = execution_macs(qm, kwargs)
    total = sum(macs.values())
    suffix, left = {}, total
    for name, m in macs.items():
        suffix[name] = left
        left -= m
    extra = total if metric == "ssim" else 0.0
    return {n: n_bits * ((suffix.get(n, total) if fast else total) + extra) for n in names}


def float_floor(cfg: DictConfig, work: Sqnr) -> dict[str, Any]:
    """The float noise floors (SQNR in dB, +inf when exact): ``run_floor_db``, the calibration run's FP
    output (``model.dtype``) against this pass's FP output (``sensitivity.dtype``); ``sensitivity_floor_db``,
    this pass's FP output against the same weights in fp32 (first batch; +inf when already fp32). A
    quantization error below a floor is masked by that dtype's own rounding."""
    for k in range(len(work.batches)):
        if k not in work.refs:
            work.run_fp(k)
    params = dict(work.qm.denoiser.named_parameters())
    sens_floor = float("inf")
    if next(iter(params.values())).dtype != torch.float32:
        from torch.func import functional_call

        fp32 = {k: v.float() for k, v in params.items()}  # buffers (the quant params) are left as they are
        kwargs = repeat_batch(work.batches[0], 1)
        kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.no_grad():
            hi = functional_call(work.qm.denoiser, fp32, args=(), kwargs={**kwargs, "return_dict": False})[0]
        sens_floor = sqnr(work.refs[0], hi)
    return {"model_dtype": cfg.model.dtype, "sensitivity_dtype": cfg.sensitivity.dtype,
            "run_floor_db": work.float_floor_db(), "sensitivity_floor_db": sens_floor}


def inseparable(result: dict[str, list[float]], floor_db: float, margin_db: float = 3.0, close_db: float = 1.0) -> str | None:
    """A warning when layers' scores at two candidate bits lie within ``close_db`` of each other and within
    ``margin_db`` of the float floor: their order is then decided by rounding noise, not by the bits."""
    if not math.isfinite(floor_db):
        return None
    layers = [n for n, vals in result.items() if any(min(a, b) >= floor_db - margin_db and abs(a - b) < close_db for a, b in zip(vals, vals[1:]))]
    if not layers:
        return None
    return (f"{len(layers)} layers (first: {layers[0]}) score two bit-widths within {close_db} dB of each other near the "
            f"{floor_db:.1f} dB float floor of sensitivity.dtype; their order is rounding noise: use sensitivity.dtype=fp32")


def _chunks(work: Metric, cache: PrefixCache | None, n: int, budget: float, done: set[tuple[int, str]], names: list[str]) -> Iterator[list[int]]:
    """Batch indices in order, grouped so that the FP activations recorded for a group fit the budget."""
    pending = [k for k in range(n) if any((k, name) not in done for name in names)]
    if cache is None:
        for k in pending:
            work.run_fp(k)
        yield pending
        return
    i = 0
    while i < len(pending):
        cache.clear()
        chunk: list[int] = []
        while i < len(pending):
            cache.record()
            work.run_fp(pending[i])
            cache.off()
            chunk.append(pending[i])
            i += 1
            if cache.nbytes() >= budget:
                break
        yield chunk
        cache.clear()


def run_sensitivity(cfg: DictConfig, run: RunDir, kinds: tuple[str, ...] = KINDS, metrics: tuple[str, ...] = METRICS,
                    method: str | None = None, pipe: Any | None = None, show: bool = True, force: bool = False) -> dict[str, dict[str, list[float]]]:
    """The sensitivity stage: ``sensitivity/<kind>_<metric>.yaml`` for every kind and metric (files finished with
    these settings by an interrupted run are kept, unless ``force``)."""
    out = {}
    for kind in kinds:
        for metric in metrics:
            out[f"{kind}_{metric}"] = values = compute_sensitivity(cfg, run, kind, metric, method, pipe, show, force=force)
            print(f"[sensitivity] {kind} {metric}: {len(values)} layers -> {result_path(run, kind, metric)}", flush=True)
    return out
