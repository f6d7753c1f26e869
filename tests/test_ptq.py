import torch

from mpq.calibration.checkpoint import load_checkpoint, read_manifest
from mpq.calibration.record import CalibData
from mpq.layers import meta_layers
from mpq.plan import BitPlan

from conftest import denoiser_sqnr, fp_outputs


def test_checkpoint_manifest_has_every_layer_and_bit(tiny_run, tiny_cfg):
    manifest = read_manifest(tiny_run.ckpt)
    assert manifest["bits"] == [2, 4, 8]
    assert len(manifest["layers"]) == 123
    assert {"name", "kind", "shape"} <= set(manifest["layers"][0])
    wq = manifest["weight_quant"]
    assert (wq["levels"], wq["granularity"]) == ("asymmetric", "kernel") and manifest["act_quant"]["momentum"] == 0.95
    # the one layer description, recorded at PTQ from the real calibration pass, equals the one built on the meta device
    # from the architecture alone (`mpq layers --meta`): input sizes, splits and BOS-aware layers included
    assert manifest["layers"] == [i.manifest_entry() for i in meta_layers(tiny_cfg)]
    assert (
        sum(len(e["in_split"]) == 3 for e in manifest["layers"]) == 6
        and sum(e["bos_aware"] for e in manifest["layers"]) == 12
    )
    assert all(e["act_numel"] > 0 for e in manifest["layers"])


def test_sqnr_ordering_uniform_bits(tiny_run, fresh_qm):
    _, qm = fresh_qm
    load_checkpoint(tiny_run.ckpt, qm)
    calib = CalibData.open(tiny_run)
    qm.set_fp()
    refs = fp_outputs(qm, calib)  # FP of this model, these batches: what every score is measured against
    scores = {}
    for w, a in ((8, 8), (4, 8), (2, 8), (None, None)):
        qm.apply(BitPlan.uniform(qm.names, w, a))
        scores[(w, a)] = denoiser_sqnr(qm, calib, refs)
    assert scores[(None, None)] == float("inf")  # an FP pass is bit-identical to an FP pass of the same batches
    assert scores[(8, 8)] > 25.0
    assert scores[(4, 8)] < scores[(8, 8)] - 6.0
    assert scores[(2, 8)] < scores[(4, 8)] - 3.0


def test_checkpoint_round_trip_restores_the_calibrated_state(tiny_run, tiny_cfg, fresh_qm, tmp_path):
    from mpq.calibration.checkpoint import save_checkpoint
    from mpq.calibration.ptq import calibrate
    from mpq.models import denoiser_of, load_pipeline
    from mpq.quant.model import QuantModel

    _, calibrated = fresh_qm
    calib = CalibData.open(tiny_run)
    calibrate(calibrated, calib, tiny_cfg, show=False)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, calibrated, tiny_cfg)
    loaded = QuantModel(denoiser_of(load_pipeline(tiny_cfg)))
    load_checkpoint(path, loaded)
    before, after = calibrated.quant_state(), loaded.quant_state()
    assert (
        before.keys() == after.keys() and len(before) == 6 * 123
    )  # qbits, w_scale, w_offset, a_scale, a_zero, a_range
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(layer.n_parts == 2 for layer in loaded.layers.values()) and any(
        layer.bos_aware for layer in loaded.layers.values()
    )
    kwargs, _ = next(calib.batches(4, torch.device("cpu")))
    plan = BitPlan(
        {n: (2, 4, 8)[i % 3] for i, n in enumerate(loaded.names)},
        {n: (4, 8)[i % 2] for i, n in enumerate(loaded.names)},
    )
    outs = []
    for qm in (calibrated, loaded):
        qm.apply(plan)
        with torch.no_grad():
            outs.append(qm(**kwargs, return_dict=False)[0])
    assert torch.equal(outs[0], outs[1])


def test_calibration_records_every_denoiser_input(tiny_run):
    calib = CalibData.open(tiny_run)
    step = calib.steps[0]
    assert {
        "sample",
        "timestep",
        "encoder_hidden_states",
        "added_cond_kwargs.text_embeds",
        "added_cond_kwargs.time_ids",
        "output",
    } <= set(step)
    assert step["sample"].shape == (8, 4, 16, 16) and step["output"].shape == (8, 4, 16, 16)
    assert step["encoder_hidden_states"].shape == (8, 77, 64)
    assert len(list(tiny_run.fp_images.glob("*.png"))) == 8
