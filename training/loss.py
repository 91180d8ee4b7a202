"""Loss functions of the paper "Elucidating the Design Space of
Diffusion-Based Generative Models": VP, VE and EDM (Table 1).

This module travels inside network pickles and is executed by whichever
release loads them, so it imports only the standard library, numpy, torch
and torch_utils.persistence.

Each loss is called as loss_fn(net, images, labels, augment_pipe) and returns
the per-pixel loss (same shape as the images). Random draws happen in a fixed
order from torch's global generator: (1) the noise level, (2) the
augmentation, (3) the noise.
"""

import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# Shared tail of every loss: augment, add noise, denoise, weighted error.

def _denoising_loss(net, images, labels, augment_pipe, sigma, weight):
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    loss = weight * ((D_yn - y) ** 2)
    return loss

#----------------------------------------------------------------------------
# Loss of the variance preserving (VP) formulation, "Score-Based Generative
# Modeling through Stochastic Differential Equations".

@persistence.persistent_class
class VPLoss:
    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise level schedule.
        beta_min    = 0.1,      # Initial slope of the noise level schedule.
        epsilon_t   = 1e-5,     # Minimum t-value used during training.
    ):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight)

    def sigma(self, t):
        """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

#----------------------------------------------------------------------------
# Loss of the variance exploding (VE) formulation, same paper.

@persistence.persistent_class
class VELoss:
    def __init__(self,
        sigma_min   = 0.02,     # Minimum noise level.
        sigma_max   = 100,      # Maximum noise level.
    ):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight)

#----------------------------------------------------------------------------
# Loss of the EDM formulation: log-normal noise levels (P_mean, P_std) and
# the weighting lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

@persistence.persistent_class
class EDMLoss:
    def __init__(self,
        P_mean      = -1.2,     # Mean of ln(sigma).
        P_std       = 1.2,      # Standard deviation of ln(sigma).
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight)

#----------------------------------------------------------------------------
