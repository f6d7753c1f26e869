"""The procedural shapes world: vocabulary, captions, held-out split, rendering, tokenizer, training script."""

import itertools
import json
import subprocess
import sys

import torch

from mpq.models.tiny import build_tokenizer, shapes_words
from mpq.shapes.data import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    HELDOUT_CAPTIONS,
    POSITIONS,
    VOCAB,
    Scene,
    all_scenes,
    heldout_scenes,
    parse_caption,
    render,
    sample_scenes,
    train_scenes,
)

from conftest import repo_root


def test_every_vocabulary_word_is_in_the_captions_and_captions_parse_back():
    scenes = all_scenes()
    assert len(scenes) == 3 * 6 * 2 * 5 * 3 == len(set(scenes))
    captions = [s.caption for s in scenes]
    words = set(" ".join(captions).split())
    for attr, values in VOCAB.items():
        for v in values:
            assert set(v.split()) <= words, (attr, v)
            assert any(getattr(s, attr) == v and v in s.caption for s in scenes)
    assert all(parse_caption(c) == s for c, s in zip(captions, scenes))
    assert (
        Scene("triangle", "blue", "small", "center", "black").caption
        == "a small blue triangle in the center on a black background"
    )
    assert parse_caption("A Large RED circle at the top right on a gray background.") == Scene(
        "circle", "red", "large", "top right", "gray"
    )
    assert (
        parse_caption("a photo of a cat") is None
        and parse_caption("a huge red circle at the top left on a white background") is None
    )


def test_heldout_scenes_are_balanced_and_never_in_training():
    held, train = set(heldout_scenes()), set(train_scenes())
    assert len(held) == len(HELDOUT_CAPTIONS) == 60 and not held & train and held | train == set(all_scenes())
    for attr in ATTRIBUTES:  # every value held out equally often
        counts = {v: sum(getattr(s, attr) == v for s in held) for v in VOCAB[attr]}
        assert len(set(counts.values())) == 1, (attr, counts)
    for a, b in itertools.combinations(ATTRIBUTES, 2):  # every pair of values is still trained on
        for va, vb in itertools.product(VOCAB[a], VOCAB[b]):
            assert any(getattr(s, a) == va and getattr(s, b) == vb for s in train), (a, va, b, vb)
    drawn = sample_scenes(5000, torch.Generator().manual_seed(0))
    assert not set(drawn) & held and len(set(drawn)) == len(train)


def test_rendering_is_deterministic_and_puts_the_shape_where_the_caption_says():
    scenes = [
        Scene(VOCAB["shape"][i % 3], VOCAB["color"][i], VOCAB["size"][i % 2], p, VOCAB["background"][i % 3])
        for i, p in enumerate(POSITIONS)
    ]
    a = render(scenes, 128, torch.Generator().manual_seed(1))
    b = render(scenes, 128, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (5, 3, 128, 128) and a.min() >= 0 and a.max() <= 1
    for img, s in zip(a, scenes):
        bg = torch.tensor(BACKGROUNDS[s.background]) / 255
        fg = torch.tensor(COLORS[s.color]) / 255
        assert torch.allclose(img[:, 0, 0], bg, atol=1e-6)  # a corner is background
        cx, cy = (int(v * 128) for v in POSITIONS[s.position])
        assert torch.allclose(img[:, cy, cx], fg, atol=1e-6)  # the position's center is the object
        partial = ((img - bg[:, None, None]).abs().sum(0) > 1e-3) & ((img - fg[:, None, None]).abs().sum(0) > 1e-3)
        assert partial.any()  # anti-aliased edge pixels
    areas = {
        sh: (render([Scene(sh, "red", "large", "center", "black")], 128, jitter=False)[0, 0] > 0.5).sum().item()
        for sh in VOCAB["shape"]
    }
    small = (render([Scene("circle", "red", "small", "center", "black")], 128, jitter=False)[0, 0] > 0.5).sum().item()
    assert 3.5 < areas["circle"] / small < 4.5  # large is twice the diameter
    assert areas["triangle"] < areas["circle"] < areas["square"]


def test_tokenizer_sees_whole_words_and_never_truncates_a_caption():
    tok = build_tokenizer()
    for w in shapes_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    longest = max((s.caption for s in all_scenes()), key=len)
    ids = tok(longest).input_ids
    assert len(ids) == len(longest.split()) + 2 <= tok.model_max_length
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in longest.split()]


def test_train_tiny_runs_two_steps_of_every_component(tmp_path):
    out = tmp_path / "tiny"
    cmd = [
        sys.executable,
        "scripts/train_tiny.py",
        "--outdir",
        str(out),
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--judge-steps",
        "2",
        "--pool-size",
        "32",
        "--unet-batch",
        "4",
        "--vae-batch",
        "2",
        "--judge-batch",
        "4",
        "--judge-eval",
        "60",
        "--threads",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root())
    assert res.returncode == 0, res.stderr[-2000:]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        assert (out / part).is_dir(), part
    state = {k: torch.load(out / ".train" / f"{k}.pt", weights_only=True) for k in ("vae", "unet", "judge")}
    assert all(s["step"] == 2 for s in state.values())
    pool = torch.load(out / ".train" / "pool.pt", weights_only=True)
    held = set(heldout_scenes())
    assert not any(train_scenes()[i] in held for i in pool["scene"].tolist())  # the UNet's training latents
    info = json.loads((out / "training.json").read_text())
    assert set(info["judge"]["fresh_renders"]) == set(ATTRIBUTES)
    # the folder loads as a pipeline and draws
    from mpq.images import generate
    from mpq.models import load_pipeline
    from mpq.runner.config import load_config

    cfg = load_config("tiny-sdxl", [f"model.id={out}", "model.device=cpu"])
    images = generate(load_pipeline(cfg), ["a small red circle in the center on a white background"], [0], cfg)
    assert images[0].size == (128, 128)
