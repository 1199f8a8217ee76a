"""Segmenter training: data, augmentation, loss and the training loop."""
