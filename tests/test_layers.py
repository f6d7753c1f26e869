from mpq.layers import meta_layers
from mpq.models.tiny import build_tokenizer
from mpq.runner.config import load_config

from conftest import repo_root


def test_sdxl_unet_on_meta_has_794_layers_420_content():
    infos = meta_layers(load_config("sdxl-turbo.yaml"))
    names = [i.name for i in infos]
    assert len(infos) == 794
    assert sum(i.group == "content" for i in infos) == 420
    by_name = {i.name: i for i in infos}
    for name in (
        "model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "model.up_blocks.0.resnets.0.conv_shortcut",
        "model.conv_in",
        "model.time_embedding.linear_1",
        "model.add_embedding.linear_2",
        "model.conv_out",
    ):
        assert name in by_name
    assert by_name["model.conv_in"].weight_numel == 11520
    assert by_name["model.down_blocks.0.resnets.0.conv1"].weight_numel / 11520 == 80.0
    # act_numel at 512 px (64x64 latents): conv_in sees 4x64x64; a skip-concatenated input counts whole
    assert by_name["model.conv_in"].act_numel == 4 * 64 * 64
    assert by_name["model.up_blocks.0.resnets.0.conv1"].act_numel == 2560 * 16 * 16
    assert by_name["model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].act_numel == 77 * 2048
    assert len(set(names)) == len(names)


def test_tiny_model_has_every_sdxl_layer_kind():
    infos = meta_layers(load_config("tiny-sdxl"))
    names = [i.name for i in infos]
    for part in (
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "add_embedding.linear_1",
        "time_emb_proj",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "proj_in",
        "proj_out",
        "attn1.to_q",
        "attn1.to_out.0",
        "attn2.to_k",
        "attn2.to_v",
        "ff.net.0.proj",
        "ff.net.2",
    ):
        assert any(part in n for n in names), part
    assert all(i.act_numel > 0 for i in infos)


def test_offline_tokenizer_gives_real_token_ids():
    tok = build_tokenizer()
    ids = tok("a red cat").input_ids
    # the shapes vocabulary is word-level; an unknown word falls back to smaller BPE pieces
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "red</w>"] and len(ids) > 5
    assert tok("a red cat").input_ids != tok("a red dog").input_ids
    padded = tok("x", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def _weights_digest(seed: int) -> str:
    import hashlib

    from mpq.models.tiny import build_pipeline

    h = hashlib.sha256()
    for k, t in build_pipeline(seed=seed).unet.state_dict().items():
        h.update(k.encode() + t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_embedded_random_model_is_the_same_in_another_process():
    """The random embedded model is built from a seed: another process, with other thread settings, builds the same
    weights byte for byte (what every machine with this torch relies on); another seed does not."""
    import os
    import subprocess
    import sys

    code = "import sys; sys.path.insert(0, 'tests'); from test_layers import _weights_digest; print(_weights_digest(3))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo_root())
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout.strip() == _weights_digest(3) != _weights_digest(4)
