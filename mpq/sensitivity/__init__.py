"""Metric-decoupled sensitivity: the scorers (SQNR, SSIM), the per-layer loop, the FP prefix cache, cost estimates,
the stage."""

METRICS = ("sqnr", "ssim")  # SQNR of the denoiser output (every layer), SSIM of images (the content group)
