"""A small stand-in for the Inception-v3 detector in the FID tests: a fixed
random projection of average-pooled pixels. It is a persistent class, so its
pickle carries this source and loads where this module is not importable."""

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class ProjectionDetector(torch.nn.Module):
    def __init__(self,
        feature_dim = 16,           # D, the length of each feature vector.
        pool        = 4,            # Images are average-pooled to pool x pool pixels.
        seed        = 0,            # Seed of the projection matrix.
        output      = 'features',   # 'features': [N, D]; 'flat': [N * D], as a broken detector would return.
    ):
        super().__init__()
        self.pool = pool
        self.output = output
        weight = np.random.RandomState(seed).randn(3 * pool * pool, feature_dim) / np.sqrt(3 * pool * pool)
        self.register_buffer('weight', torch.from_numpy(weight)) # float64, so features do not depend on the batch

    def forward(self, images, return_features=False):
        if not return_features:
            raise ValueError('only return_features=True is supported')
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'expected uint8 [N, 3, H, W] images, got {images.dtype} {list(images.shape)}')
        x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float64) / 255, self.pool)
        features = x.flatten(1) @ self.weight
        return features.flatten() if self.output == 'flat' else features

#----------------------------------------------------------------------------

def numpy_features(images, detector):
    """The same features computed with numpy from uint8 [N, H, W, C] images (C = 1 or 3; H, W multiples of pool)."""
    x = images.astype(np.float64) / 255
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    N, H, W, _C = x.shape
    p = detector.pool
    x = x.transpose(0, 3, 1, 2).reshape(N, 3, p, H // p, p, W // p).mean(axis=(3, 5))
    return x.reshape(N, -1) @ detector.weight.numpy()

#----------------------------------------------------------------------------
