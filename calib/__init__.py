"""Calibration: the model's own generations, sample selection (DGC), resampling, observers."""
