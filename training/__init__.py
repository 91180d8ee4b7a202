"""The research code: networks, losses, augmentation, datasets, training loop."""
