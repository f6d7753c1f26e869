import pytest
import torch

from mpq.quant.quantizer import (
    act_qparams,
    fake_quant,
    qrange,
    quantize_weight,
    running_minmax,
    weight_scale,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequant_error_within_half_step_inside_range(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    scale = weight_scale(w, bits)
    qmin, qmax = qrange(bits, symmetric=True)
    wq = quantize_weight(w, scale, bits)
    inside = (w >= qmin * scale) & (w <= qmax * scale)
    err = (wq - w).abs()
    assert inside.float().mean() > 0.5
    assert torch.all(err[inside] <= (scale.expand_as(w)[inside] / 2) * (1 + 1e-6))
    # the grid has at most 2^bits levels per channel
    for row, s in zip(wq, scale.flatten()):
        assert len(torch.unique(torch.round(row / s))) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_clamping_at_integer_limits(bits):
    qmin, qmax = qrange(bits, symmetric=False)
    assert (qmin, qmax) == (0, 2**bits - 1)
    scale, zp = act_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits)
    x = torch.tensor([-100.0, -1.0, 0.0, 3.0, 100.0])
    y = fake_quant(x, scale, zp, qmin, qmax)
    assert y[0] == pytest.approx(float((qmin - zp) * scale))  # clamped at the lower integer limit
    assert y[-1] == pytest.approx(float((qmax - zp) * scale))  # clamped at the upper one
    assert y[2] == 0.0  # zero is exact
    assert abs(float(y[1]) + 1.0) <= float(scale) / 2 + 1e-6
    sqmin, sqmax = qrange(bits, symmetric=True)
    assert (sqmin, sqmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    w = torch.tensor([[-50.0, 0.1, 50.0]])
    s = torch.tensor([[0.1]])
    assert fake_quant(w, s, 0.0, sqmin, sqmax).tolist()[0] == pytest.approx([sqmin * 0.1, 0.1, sqmax * 0.1])


def test_per_channel_scale_shapes_linear_and_conv():
    lin = torch.nn.Linear(12, 7)
    conv = torch.nn.Conv2d(3, 5, 3)
    assert weight_scale(lin.weight, 4).shape == (7, 1)
    assert weight_scale(conv.weight, 4).shape == (5, 1, 1, 1)
    assert weight_scale(conv.weight, 4, per_channel=False).shape == (1, 1, 1, 1)
    # each channel's scale follows its own max
    w = torch.ones(3, 4) * torch.tensor([[1.0], [2.0], [4.0]])
    assert weight_scale(w, 8).flatten().tolist() == pytest.approx([1 / 127, 2 / 127, 4 / 127])


def test_mse_scale_search_picks_each_channels_best_clipping_and_beats_minmax_on_outliers():
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    w[:, 0] *= 20  # outliers: clipping pays off at low bits
    for bits in (2, 4):
        qmax = qrange(bits, symmetric=True)[1]
        amax = w.abs().amax(dim=1, keepdim=True)
        per_ratio = torch.stack(
            [
                (quantize_weight(w, amax * r / qmax, bits) - w).pow(2).sum(dim=1)
                for r in torch.linspace(1.0, 0.3, 50).tolist()
            ]
        )  # brute force over the same grid
        chosen = (
            (quantize_weight(w, weight_scale(w, bits, method="mse", grid=50, min_ratio=0.3), bits) - w)
            .pow(2)
            .sum(dim=1)
        )
        assert torch.allclose(chosen, per_ratio.min(dim=0).values, rtol=1e-6)
        minmax = per_ratio[0].sum()
        assert (
            chosen.sum() < 0.9 * minmax
        )  # with outliers, clipping removes ~20% of the error (measured 0.80x at 2 and 4 bits)


def test_running_minmax_momentum():
    s = running_minmax(None, torch.tensor([-1.0, 2.0]), 0.95)
    assert [float(v) for v in s] == [-1.0, 2.0]
    s = running_minmax(s, torch.tensor([-3.0, 4.0]), 0.95)
    assert float(s[0]) == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert float(s[1]) == pytest.approx(0.95 * 2 + 0.05 * 4)


def test_all_bits_minmax_scales_match_per_bit_scales():
    from mpq.quant.quantizer import weight_scales

    torch.manual_seed(2)
    w = torch.randn(8, 4, 3, 3)
    shared = weight_scales(w, [2, 4, 8])
    for b in (2, 4, 8):
        assert torch.equal(shared[b], weight_scale(w, b))
    mse = weight_scales(w, [2, 4], method="mse")
    assert torch.equal(mse[2], weight_scale(w, 2, method="mse"))


def test_image_metrics_match_torchmetrics_definitions():
    """mpq computes PSNR from its MSE and SSIM with scikit-image (fast on CPU): the same numbers as torchmetrics."""
    import numpy as np
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    from mpq.metrics import image_psnr, image_ssim

    rng = np.random.default_rng(0)
    a = rng.random((3, 64, 64, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    psnr = peak_signal_noise_ratio(ta, tb, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()
    assert np.allclose(image_psnr(a, b), psnr, rtol=1e-6)  # torchmetrics sums in float32
    ssim = structural_similarity_index_measure(ta, tb, data_range=1.0, reduction="none").numpy()
    assert np.allclose(
        image_ssim(a, b, "gaussian"), ssim, atol=1e-3
    )  # same definition; border handling differs slightly
