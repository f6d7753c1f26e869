import torch

from mpq.calib import CalibData
from mpq.ckpt import load_checkpoint, read_manifest
from conftest import denoiser_sqnr


def test_checkpoint_manifest_has_every_layer_and_bit(tiny_run, tiny_cfg):
    manifest = read_manifest(tiny_run.ckpt)
    assert manifest["bits"] == [2, 4, 8]
    assert len(manifest["layers"]) == 123
    assert {"name", "kind", "shape"} <= set(manifest["layers"][0])
    assert manifest["weight_quant"]["symmetric"] is True and manifest["act_quant"]["momentum"] == 0.95


def test_sqnr_ordering_uniform_bits(tiny_run, fresh_qm):
    _, qm = fresh_qm
    load_checkpoint(tiny_run.ckpt, qm)
    calib = CalibData.open(tiny_run)
    scores = {}
    for w, a in ((8, 8), (4, 8), (2, 8), (None, None)):
        qm.set_uniform(w, a)
        scores[(w, a)] = denoiser_sqnr(qm, calib)
    assert scores[(None, None)] == float("inf")  # FP replay reproduces the recorded output exactly
    assert scores[(8, 8)] > 25.0
    assert scores[(4, 8)] < scores[(8, 8)]
    assert scores[(2, 8)] < scores[(4, 8)]


def test_checkpoint_round_trip_is_bit_identical(tiny_run, tiny_cfg, fresh_qm):
    from mpq.models import denoiser_of, load_pipeline
    from mpq.quant.model import QuantModel

    _, qm1 = fresh_qm
    load_checkpoint(tiny_run.ckpt, qm1)
    qm2 = QuantModel(denoiser_of(load_pipeline(tiny_cfg)))
    load_checkpoint(tiny_run.ckpt, qm2)
    state1, state2 = qm1.quant_state(), qm2.quant_state()
    assert state1.keys() == state2.keys()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    calib = CalibData.open(tiny_run)
    kwargs, _ = next(calib.batches(4, torch.device("cpu")))
    plan_w = {n: (2, 4, 8)[i % 3] for i, n in enumerate(qm1.names)}
    plan_a = {n: (4, 8)[i % 2] for i, n in enumerate(qm1.names)}
    outs = []
    for qm in (qm1, qm2):
        qm.apply(plan_w, plan_a)
        with torch.no_grad():
            outs.append(qm(**kwargs, return_dict=False)[0])
    assert torch.equal(outs[0], outs[1])


def test_calibration_records_every_denoiser_input(tiny_run):
    calib = CalibData.open(tiny_run)
    step = calib.steps[0]
    assert {"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids", "output"} <= set(step)
    assert step["sample"].shape == (8, 4, 16, 16) and step["output"].shape == (8, 4, 16, 16)
    assert step["encoder_hidden_states"].shape == (8, 77, 64)
    assert len(list(tiny_run.fp_images.glob("*.png"))) == 8
