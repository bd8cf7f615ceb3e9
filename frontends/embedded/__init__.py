"""Small files the repository ships: the MNIST classifier and its held-out FID statistics (CLASSIFIER.md)."""
