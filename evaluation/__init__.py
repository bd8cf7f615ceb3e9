"""Scoring generated images: metrics (FID, IS, precision/recall, PSNR, SSIM, token agreement), the
feature networks behind them (FID Inception, the shipped MNIST classifier) and the MNIST data.

Above ``core`` only: it imports no other package of the project, so any layer can score images.
"""
