"""Calibration and PTQ: the FP run recorded (``record``), quant params for every candidate bit (``ptq``), the
checkpoint with the one layer description (``checkpoint``)."""
