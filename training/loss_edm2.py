"""Training loss and learning-rate schedule of the paper "Analyzing and
Improving the Training Dynamics of Diffusion Models" (Karras et al. 2024,
EDM2): the EDM loss weighted by the learned uncertainty u(sigma)
(Equations 14, 15, 16 and 21), and the inverse-square-root decay
(Equation 67).

This module travels inside network pickles (as their `loss_fn`) and is
executed by whoever loads them in full, the published release too, so it
imports only numpy, torch and torch_utils.persistence."""

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------
# EDM loss with the learned uncertainty: L = lambda(sigma) / e^u(sigma) ||D - y||^2 + u(sigma).

@persistence.persistent_class
class EDM2Loss:
    def __init__(self,
        P_mean      = -0.4,     # Mean of ln(sigma).
        P_std       = 1.0,      # Standard deviation of ln(sigma).
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        if augment_pipe is not None:
            raise ValueError('EDM2Loss takes no augment_pipe: the EDM2 networks have no augmentation conditioning')
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        loss = (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar
        return loss

#----------------------------------------------------------------------------
# Learning rate alpha_ref / sqrt(max(t / t_ref, 1)), t in batches, with a linear ramp-up.

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr

#----------------------------------------------------------------------------
