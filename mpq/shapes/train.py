"""Train the embedded model from scratch on procedural shapes (``scripts/train_tiny.py``).

Four phases, each seeded and resumable (state every ``save_every`` steps in
``OUTDIR/.train/``; a killed run resumes where it stopped and ends with the
same weights):

1. **VAE** (``AutoencoderKL``, 8x): L1 + MSE reconstruction, weighted up on and
   around the shape (else the flat background dominates the loss), and a small
   KL term; the posterior starts near-deterministic (log-variance bias -8).
2. **Latent pool**: ``pool_size`` training renders (jittered) encoded once;
   the scaling factor is set to 1 / std of the latents, as SD did.
3. **UNet and both text encoders together**, from scratch, through the
   pipeline's own ``encode_prompt`` (the exact text path used at inference):
   v-prediction, MSE, AdamW, constant LR after warmup, EMA weights. Half the timesteps are
   uniform, half are the trailing timesteps a 1/2/4-step sampler visits
   (999, 749, 499, 249): the model is used with few steps, so those are
   where it must be best.
4. **Judge** (:class:`mpq.shapes.judge.ShapeJudge`) on renders of all 540
   scenes with blur/noise/gain augmentation; its accuracy per head on fresh
   renders is measured and stored in its metadata.

The result is a diffusers folder (``save_pretrained`` layout) plus
``shapes-judge.safetensors``; ``mpq.models`` ships exactly such a folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpq.errors import MpqError
from mpq.runner.files import write_with
from mpq.runner.outputs import OutputKind
from mpq.runner.progress import progress
from mpq.shapes.data import (
    ATTRIBUTES,
    all_scenes,
    heldout_scenes,
    render,
    sample_scenes,
    to_uint8,
    train_scenes,
)
from mpq.shapes.judge import ShapeJudge, save_judge

STATE_DIR, INFO, JUDGE_FILE = ".train", "training.json", "shapes-judge.safetensors"  # beside the pipeline's folders
TRAINING = OutputKind(
    "training folder",
    (f"{STATE_DIR}/*", INFO, JUDGE_FILE, "model_index.json", "*/*"),
    lambda folder: (folder / STATE_DIR).is_dir() or (folder / INFO).is_file(),
)
TRAIN_TIMESTEPS = (999, 749, 499, 249)  # what trailing spacing visits with 1, 2 and 4 steps


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by :meth:`_Phase.save` (or the latent pool), read as tensors and plain containers
    only: a file that needs anything else to unpickle (code, classes) is refused in one line, never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a file this trainer did not write
        raise MpqError(
            f"{path} is not a training state this trainer wrote ({type(err).__name__}); delete it (training restarts "
            "that phase) or give another --outdir"
        ) from None
    if not isinstance(state, dict):
        raise MpqError(f"{path} is not a training state this trainer wrote; delete it or give another --outdir")
    return state


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cpu"
    resolution: int = 128
    vae_steps: int = 4000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_shape_weight: float = 10.0
    vae_kl: float = 1e-6
    pool_size: int = 16384
    unet_steps: int = 1000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    judge_steps: int = 1500
    judge_batch: int = 64
    judge_lr: float = 2e-3
    judge_eval: int = 3000
    save_every: int = 200
    # the second embedded model (--model tiny-sd3): an MMDiT trained on the VAE and text encoders of tiny-sdxl
    model: str = "tiny-sdxl"
    base: str = ""  # the tiny-sdxl folder whose VAE and text encoders tiny-sd3 reuses (default: the shipped one)
    mmdit_steps: int = 2000
    mmdit_batch: int = 64
    mmdit_lr: float = 1e-3
    caption_dropout: float = 0.1  # captions replaced by "" (the negative prompt): what guidance extrapolates from


# ------------------------------------------------------------------------------ helpers
def _lr_lambda(steps: int, warmup: int, cosine: bool = True) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class _Phase:
    """Model(s), optimizer, scheduler, data generator and step of one phase, saved and restored as one."""

    def __init__(
        self,
        name: str,
        root: Path,
        modules: dict[str, torch.nn.Module],
        lr: float,
        steps: int,
        seed: int,
        extra: dict[str, Any] | None = None,
        cosine: bool = True,
        warmup: int | None = None,
    ) -> None:
        self.name, self.path, self.modules, self.steps = name, root / f"{name}.pt", modules, steps
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
        warmup = warmup if warmup is not None else min(300, max(1, steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(steps, warmup, cosine))
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.extra = extra or {}
        self.elapsed_s = 0.0  # wall time spent in this phase, summed over resumed runs
        self._t0 = time.perf_counter()
        if self.path.is_file():
            state = load_state(self.path)
            # a cosine schedule depends on the total; a constant one does not, so such a phase may be extended
            # (or finished early at a saved step): its first N steps are the same whatever the total
            if (cosine and state.get("steps") != steps) or state["step"] > steps:
                raise MpqError(
                    f"{self.path} is from a run with {state.get('steps')} {name} steps, not {steps}; delete it or give "
                    "the same steps"
                )
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.gen.set_state(state["gen"])
            self.step = state["step"]
            self.extra = state.get("extra", self.extra)
            self.elapsed_s = float(state.get("elapsed_s", 0.0))

    def save(self) -> None:
        now = time.perf_counter()
        self.elapsed_s += now - self._t0
        self._t0 = now
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "gen": self.gen.get_state(),
            "step": self.step,
            "steps": self.steps,
            "extra": self.extra,
            "elapsed_s": self.elapsed_s,
        }
        write_with(self.path, lambda tmp: torch.save(state, tmp))

    def loop(self, every: int, desc: str) -> Iterator[int]:
        bar = progress(total=self.steps, initial=self.step, desc=desc, unit="step", mininterval=5.0)
        try:
            while self.step < self.steps:
                yield self.step
                self.sched.step()
                self.step += 1
                bar.update(1)
                if self.step % every == 0 or self.step == self.steps:
                    self.save()
        finally:
            bar.close()


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# ------------------------------------------------------------------------------ 1. VAE
def _vae_batch(cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered 8-bit renders of training scenes in [-1, 1], and per-pixel loss weights: ``1 + vae_shape_weight``
    on and around the shape (dilated 3 px), so that its color and outline are not outweighed by the background."""
    from mpq.shapes.data import BACKGROUNDS

    scenes = sample_scenes(cfg.vae_batch, gen)  # training scenes only: held-out scenes reach no part of the model
    images = to_uint8(render(scenes, cfg.resolution, gen))
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)[:, :, None, None] / 255
    shape = ((images - bg).abs().sum(1, keepdim=True) > 0.02).float()
    weight = 1 + cfg.vae_shape_weight * F.max_pool2d(shape, 7, stride=1, padding=3)
    return images * 2 - 1, weight


def train_vae(pipe: Any, cfg: TrainConfig, root: Path, log: Callable[[str], None]) -> float:
    """Train the VAE in place; returns the phase's wall seconds (summed over resumed runs)."""
    vae = pipe.vae.train().requires_grad_(True)
    with (
        torch.no_grad()
    ):  # start near-deterministic (posterior std ~0.02): with std ~1 the decoder first sees mostly noise
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    phase = _Phase("vae", root, {"vae": vae}, cfg.vae_lr, cfg.vae_steps, cfg.seed + 1)
    params = list(vae.parameters())
    dev = torch.device(cfg.device)
    for _ in phase.loop(cfg.save_every, "train: VAE"):
        x, w = (t.to(dev) for t in _vae_batch(cfg, phase.gen))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=phase.gen).to(dev)
        d = vae.decode(z).sample - x
        loss = (w * (d.abs() + d.pow(2))).mean() / w.mean() + cfg.vae_kl * post.kl().mean()
        _step(phase.opt, loss, params)
        if phase.step % 500 == 0:
            log(f"  vae step {phase.step}: loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    return phase.elapsed_s


# ------------------------------------------------------------------------------ 2. latent pool
@torch.no_grad()
def encode_pool(pipe: Any, cfg: TrainConfig, root: Path) -> dict[str, torch.Tensor]:
    """``pool_size`` jittered training renders: their scene index, latent mean and std (unscaled)."""
    path = root / "pool.pt"
    if path.is_file():
        pool = load_state(path)
        if len(pool["scene"]) == cfg.pool_size:
            return pool
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    scenes = train_scenes()
    dev = torch.device(cfg.device)
    idx, means, stds = [], [], []
    for i in progress(range(0, cfg.pool_size, 64), desc="train: encode latent pool", unit="batch", mininterval=5.0):
        n = min(64, cfg.pool_size - i)
        k = torch.randint(len(scenes), (n,), generator=gen)
        images = to_uint8(render([scenes[j] for j in k.tolist()], cfg.resolution, gen)) * 2 - 1
        post = pipe.vae.encode(images.to(dev)).latent_dist
        idx.append(k)
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    pool = {"scene": torch.cat(idx), "mean": torch.cat(means), "std": torch.cat(stds)}
    write_with(path, lambda tmp: torch.save(pool, tmp))
    return pool


# ------------------------------------------------------------------------------ 3. UNet + text encoders
def _time_ids(resolution: int, n: int) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size), as the pipeline builds them."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(n, 1)


def train_unet(
    pipe: Any, cfg: TrainConfig, pool: dict[str, torch.Tensor], root: Path, log: Callable[[str], None]
) -> float:
    """Train the UNet and both text encoders in place (EMA weights kept); returns the phase's wall seconds."""
    from diffusers import DDPMScheduler

    dev = torch.device(cfg.device)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    trained = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for m in trained.values():
        m.train().requires_grad_(True)
    ema = {k: [p.detach().clone() for p in m.parameters()] for k, m in trained.items()}
    # constant LR after a fixed warmup, EMA weights as the model: the run with N steps is the first N steps of
    # any longer run, so a long run can be stopped at any saved step and reproduced with --unet-steps N
    phase = _Phase(
        "unet", root, trained, cfg.unet_lr, cfg.unet_steps, cfg.seed + 3, extra={"ema": ema}, cosine=False, warmup=300
    )
    ema = phase.extra["ema"]
    params = [p for m in trained.values() for p in m.parameters()]
    captions = [s.caption for s in train_scenes()]
    sf = pipe.vae.config.scaling_factor
    special = torch.tensor(TRAIN_TIMESTEPS)
    time_ids = _time_ids(cfg.resolution, cfg.unet_batch).to(dev)
    for _ in phase.loop(cfg.save_every, "train: UNet + text encoders"):
        g = phase.gen
        k = torch.randint(len(pool["scene"]), (cfg.unet_batch,), generator=g)
        z0 = (pool["mean"][k] + pool["std"][k] * torch.randn(pool["mean"][k].shape, generator=g)) * sf
        noise = torch.randn(z0.shape, generator=g)
        uniform = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        t = torch.where(
            torch.rand(cfg.unet_batch, generator=g) < 0.5,
            uniform,
            special[torch.randint(len(special), (cfg.unet_batch,), generator=g)],
        )
        xt = noise_sched.add_noise(z0, noise, t)
        target = noise_sched.get_velocity(z0, noise, t)
        prompts = [captions[i] for i in pool["scene"][k].tolist()]
        emb, _, pooled, _ = pipe.encode_prompt(
            prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        pred = pipe.unet(
            xt.to(dev), t.to(dev), emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        loss = F.mse_loss(pred, target.to(dev))
        _step(phase.opt, loss, params)
        decay = min(cfg.ema_decay, (1 + phase.step) / (10 + phase.step))
        with torch.no_grad():
            for key, m in trained.items():
                torch._foreach_lerp_(ema[key], [p.detach() for p in m.parameters()], 1 - decay)
        if phase.step % 500 == 0:
            log(f"  unet step {phase.step}: loss {loss.item():.5f}")
    with torch.no_grad():  # the EMA weights are the model
        for key, m in trained.items():
            for p, e in zip(m.parameters(), ema[key]):
                p.copy_(e)
            m.eval().requires_grad_(False)
    return phase.elapsed_s


# ------------------------------------------------------------------------------ 3b. MMDiT (tiny-sd3)
@torch.no_grad()
def encode_captions(pipe: Any, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption through the SD3 pipeline's own ``encode_prompt`` (frozen text encoders: once, not per step)."""
    from mpq.models.tiny_sd3 import T5_TOKENS

    embeds, pooled = [], []
    for i in range(0, len(captions), 64):
        pe, _, ppe, _ = pipe.encode_prompt(
            prompt=captions[i : i + 64],
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS,
        )
        embeds.append(pe)
        pooled.append(ppe)
    return torch.cat(embeds), torch.cat(pooled)


def flow_sigmas(scheduler_config: Any, steps: int) -> torch.Tensor:
    """The noise levels a ``steps``-step FlowMatchEuler sampler visits (its shift applied), the last excluded."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched.sigmas[:-1].float().cpu()


def train_mmdit(
    pipe: Any, cfg: TrainConfig, pool: dict[str, torch.Tensor], root: Path, log: Callable[[str], None]
) -> float:
    """Train the SD3 transformer in place with flow matching (EMA weights kept); returns the phase's wall seconds.

    x_t = (1 - s) x0 + s noise, target v = noise - x0 (what FlowMatchEuler integrates), timestep 1000 s; half the
    noise levels logit-normal (SD3's), half exactly those the default sampler visits; ``caption_dropout`` of the
    captions are "" (the pipeline's default negative prompt), so classifier-free guidance has an unconditional
    model to extrapolate from."""
    from mpq.models.tiny_sd3 import STEPS

    dev = torch.device(cfg.device)
    model = pipe.transformer.train().requires_grad_(True)
    ema = {"transformer": [p.detach().clone() for p in model.parameters()]}
    phase = _Phase(
        "mmdit",
        root,
        {"transformer": model},
        cfg.mmdit_lr,
        cfg.mmdit_steps,
        cfg.seed + 8,
        extra={"ema": ema},
        cosine=False,
        warmup=300,
    )
    ema = phase.extra["ema"]
    params = list(model.parameters())
    captions = [s.caption for s in train_scenes()]
    embeds, pooled = encode_captions(pipe, captions + [""], dev)
    empty = len(captions)
    sf = pipe.vae.config.scaling_factor
    shift = pipe.vae.config.shift_factor or 0.0
    special = flow_sigmas(pipe.scheduler.config, STEPS)
    for _ in phase.loop(cfg.save_every, "train: MMDiT"):
        g, n = phase.gen, cfg.mmdit_batch
        k = torch.randint(len(pool["scene"]), (n,), generator=g)
        z0 = ((pool["mean"][k] + pool["std"][k] * torch.randn(pool["mean"][k].shape, generator=g)) - shift) * sf
        noise = torch.randn(z0.shape, generator=g)
        sigma = torch.where(
            torch.rand(n, generator=g) < 0.5,
            torch.sigmoid(torch.randn(n, generator=g)),
            special[torch.randint(len(special), (n,), generator=g)],
        )
        s = sigma[:, None, None, None]
        xt = (1 - s) * z0 + s * noise
        idx = torch.where(torch.rand(n, generator=g) < cfg.caption_dropout, torch.full_like(k, empty), pool["scene"][k])
        pred = model(
            hidden_states=xt.to(dev),
            encoder_hidden_states=embeds[idx.to(embeds.device)],
            pooled_projections=pooled[idx.to(pooled.device)],
            timestep=(sigma * 1000).to(dev),
        ).sample
        loss = F.mse_loss(pred, (noise - z0).to(dev))
        _step(phase.opt, loss, params)
        decay = min(cfg.ema_decay, (1 + phase.step) / (10 + phase.step))
        with torch.no_grad():
            torch._foreach_lerp_(ema["transformer"], [p.detach() for p in model.parameters()], 1 - decay)
        if phase.step % 250 == 0:
            log(f"  mmdit step {phase.step}: loss {loss.item():.5f}")
    with torch.no_grad():  # the EMA weights are the model
        for p, e in zip(model.parameters(), ema["transformer"]):
            p.copy_(e)
    model.eval().requires_grad_(False)
    return phase.elapsed_s


def train_tiny_sd3(outdir: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """tiny-sd3: the latent pool through tiny-sdxl's VAE (same seed, same renders), then the MMDiT; the text
    encoders, VAE and judge are tiny-sdxl's, unchanged."""
    from mpq.models.loader import WEIGHTS_DIR
    from mpq.models.tiny_sd3 import build_pipeline

    out = Path(outdir)
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    base = Path(cfg.base) if cfg.base else WEIGHTS_DIR / "tiny-sdxl"
    if not (base / "vae" / "config.json").is_file():
        raise MpqError(f"--base {base} is not a tiny-sdxl folder (no vae/config.json); give the shipped model's folder")
    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(base)
    pipe.to(cfg.device)
    t0 = time.perf_counter()
    pool = encode_pool(pipe, cfg, root)
    timings = {"pool_s": time.perf_counter() - t0, "mmdit_s": train_mmdit(pipe, cfg, pool, root, log)}
    pipe.to("cpu")
    pipe.save_pretrained(out)
    keep = (
        "seed",
        "device",
        "resolution",
        "pool_size",
        "model",
        "mmdit_steps",
        "mmdit_batch",
        "mmdit_lr",
        "caption_dropout",
        "ema_decay",
        "save_every",
    )
    info = {
        "config": {k: v for k, v in asdict(cfg).items() if k in keep},
        "reused": "VAE, text encoders and tokenizer of embedded:tiny-sdxl (frozen); judge: shapes-judge.safetensors",
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------ 4. judge
def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (sigma 0..1.5 px), color gain/offset (+-4%), noise (sigma 0..0.05), 8-bit rounding."""
    n = images.shape[0]
    sigma = float(torch.rand(1, generator=gen)) * 1.5
    if sigma > 0.2:
        r = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * sigma**2))
        k = (k / k.sum()).to(images)
        images = F.conv2d(
            F.pad(images, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3
        )
        images = F.conv2d(
            F.pad(images, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3
        )
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.04
    offset = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.04
    noise = torch.randn(images.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.05
    return to_uint8(images * gain + offset + noise)


def judge_accuracy(judge: ShapeJudge, scenes: list[Any], resolution: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    images = to_uint8(render(scenes, resolution, gen))
    preds = judge.predict(images)
    truth = torch.tensor([s.label() for s in scenes])
    return {a: float((preds[a] == truth[:, k]).float().mean()) for k, a in enumerate(ATTRIBUTES)}


def train_judge(cfg: TrainConfig, root: Path, log: Callable[[str], None]) -> tuple[ShapeJudge, dict[str, Any], float]:
    judge = ShapeJudge()
    phase = _Phase("judge", root, {"judge": judge}, cfg.judge_lr, cfg.judge_steps, cfg.seed + 4)
    params = list(judge.parameters())
    scenes = all_scenes()
    for _ in phase.loop(cfg.save_every, "train: judge"):
        batch = sample_scenes(cfg.judge_batch, phase.gen, scenes)
        x = _augment(render(batch, cfg.resolution, phase.gen), phase.gen)
        logits = judge(x)
        truth = torch.tensor([s.label() for s in batch])
        loss = sum(F.cross_entropy(logits[a], truth[:, k]) for k, a in enumerate(ATTRIBUTES))
        _step(phase.opt, loss, params)  # type: ignore[arg-type]
    judge.eval().requires_grad_(False)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 5)
    metrics = {
        "fresh_renders": judge_accuracy(
            judge, sample_scenes(cfg.judge_eval, eval_gen, scenes), cfg.resolution, cfg.seed + 6
        ),
        "heldout_scenes": judge_accuracy(
            judge, list(heldout_scenes()) * max(1, cfg.judge_eval // 60 // 4), cfg.resolution, cfg.seed + 7
        ),
    }
    log(f"  judge accuracy on fresh renders: {json.dumps(metrics['fresh_renders'])}")
    return judge, metrics, phase.elapsed_s


# ------------------------------------------------------------------------------ all
def train_tiny(outdir: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every component and write the diffusers folder + judge into ``outdir`` (``cfg.model`` tiny-sdxl), or
    the MMDiT of tiny-sd3 (:func:`train_tiny_sd3`)."""
    from mpq.models.tiny import build_pipeline

    if cfg.model == "tiny-sd3":
        return train_tiny_sd3(outdir, cfg, log)
    if cfg.model != "tiny-sdxl":
        raise MpqError(f"--model {cfg.model}: unknown; choose tiny-sdxl or tiny-sd3")

    out = Path(outdir)
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(seed=cfg.seed + 1000)
    pipe.to(cfg.device)
    # wall seconds per phase, summed over resumed runs (a phase saved by an older mpq counts only its resumed part)
    timings: dict[str, float] = {"vae_s": train_vae(pipe, cfg, root, log)}
    t0 = time.perf_counter()
    pool = encode_pool(pipe, cfg, root)
    sf = float(1.0 / pool["mean"].std())
    pipe.vae.register_to_config(scaling_factor=round(sf, 5))
    timings["pool_s"] = time.perf_counter() - t0
    log(f"  latent std {1 / sf:.4f}: scaling_factor {pipe.vae.config.scaling_factor}")
    timings["unet_s"] = train_unet(pipe, cfg, pool, root, log)
    judge, metrics, timings["judge_s"] = train_judge(cfg, root, log)
    pipe.to("cpu")
    pipe.save_pretrained(out)
    save_judge(judge, out / JUDGE_FILE, metrics)
    info = {"config": asdict(cfg), "timings_s": {k: round(v, 1) for k, v in timings.items()}, "judge": metrics}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info
