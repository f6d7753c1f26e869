"""Metric-decoupled sensitivity: the scorers (SQNR, SSIM), the per-layer loop, the FP prefix cache, cost estimates,
the stage."""
