"""Sampling EDM2 networks as the EDM2 release does: its defaults (32 Heun
steps in float32, sigma in [0.002, 80] for a network that states no range),
its label draw, autoguidance with a guiding network, and decoding the
result to pixels with the pickle's `encoder`. A network is sampled this way
when it has no `sigma_min`/`sigma_max` of its own (training/networks_edm2.py's
Precond); the EDM networks keep training/sampling.py."""

import os

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training.image_io import save_image
from training.sampling import StackedRandomGenerator, latents_and_labels
from training import solvers

EDM2_SAMPLER_DEFAULTS = dict(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7)
EDM2_SAMPLER_OPTIONS = ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise') # what generate.py passes on

#----------------------------------------------------------------------------

def is_edm2_network(net):
    """Is `net` sampled the EDM2 way: a denoiser that states no noise range of its own?"""
    return not (hasattr(net, 'sigma_min') and hasattr(net, 'sigma_max'))

def edm2_sampler_kwargs(net, **overrides):
    """The EDM2 release's sampler options for `net` (its own sigma range, if it has one), updated by the given ones."""
    kwargs = dict(EDM2_SAMPLER_DEFAULTS)
    for name in ('sigma_min', 'sigma_max'):
        if hasattr(net, name):
            kwargs[name] = float(getattr(net, name))
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    return kwargs

def default_encoder(data):
    """The pickle's `encoder`, or pixels scaled to [-1, 1] (StandardRGBEncoder) when it holds none."""
    encoder = data.get('encoder') if isinstance(data, dict) else None
    if encoder is None:
        encoder = dnnlib.util.construct_class_by_name(class_name='training.encoders.StandardRGBEncoder')
    return encoder

#----------------------------------------------------------------------------
# The EDM sampler (Algorithm 2 of Karras et al. 2022) as the EDM2 release runs it:
# in `dtype` (float32), sigma not rounded, guidance D = D0 + w (D1 - D0).

def edm2_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, dtype=torch.float32, randn_like=torch.randn_like):
    """Heun's 2nd-order sampler with optional churn, in `dtype`; `gnet` guides with weight `guidance` (1 = none)."""
    if guidance != 1 and gnet is None:
        raise ValueError('guidance needs a guiding network (gnet)')

    def denoise(x, t):
        D1 = net(x, t, labels).to(dtype)
        if guidance == 1:
            return D1
        D0 = gnet(x, t, labels).to(dtype)
        return D0.lerp(D1, guidance)

    # Time steps t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t_N = 0.
    i = torch.arange(num_steps, dtype=dtype, device=noise.device)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat.
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur

        # Euler step, then the 2nd-order correction except at the last step.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

#----------------------------------------------------------------------------

def edm2_batches(seeds, max_batch_size, rank=0, world_size=1):
    """This rank's batches of seed indices, split as the EDM2 release splits them."""
    num_batches = max((len(seeds) - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    return np.array_split(np.arange(len(seeds)), num_batches)[rank :: world_size]

def edm2_images(net, encoder, seeds, device, class_idx=None, gnet=None, sampler='edm', **sampler_kwargs):
    """uint8 [N, C, H, W] pixels of one batch of seeds: noise, then labels, from one generator per seed; sampled by
    edm2_sampler (sampler 'edm') or by a solver of training/solvers.py."""
    rnd = StackedRandomGenerator(device, list(seeds))
    noise, labels = latents_and_labels(net, rnd, device, class_idx)
    with torch.no_grad():
        if sampler == 'edm':
            latents = edm2_sampler(net, noise, labels, gnet=gnet, randn_like=rnd.randn_like, **edm2_sampler_kwargs(net, **sampler_kwargs))
        else:
            latents = solvers.SOLVERS[sampler](net, noise, labels, randn_like=rnd.randn_like, gnet=gnet, **sampler_kwargs).to(torch.float32)
        return encoder.decode(latents)

#----------------------------------------------------------------------------

def check_edm2_options(sampler, sampler_kwargs, guidance_interval=None, precision='fp32', use_compile=False):
    """Raise ValueError for command-line options that the EDM2 sampling here does not take."""
    if sampler == 'ablation':
        raise ValueError('an EDM2 network is sampled with the EDM2 sampler or a low-step --solver, not the ablation sampler '
                         '(--solver=euler|heun alone, --disc, --schedule=vp|ve|linear, --scaling)')
    unknown = sorted(key for key, value in sampler_kwargs.items() if value is not None and key not in EDM2_SAMPLER_OPTIONS)
    if sampler == 'edm' and unknown:
        raise ValueError(f'an EDM2 network is sampled with the EDM2 sampler, which takes no --{", --".join(unknown)}')
    if sampler == 'edm' and guidance_interval is not None:
        raise ValueError('the EDM2 sampler guides at every noise level: --guidance-interval needs a low-step --solver')
    if precision != 'fp32' or use_compile:
        raise ValueError('an EDM2 network is sampled in float32 as the EDM2 release samples it (no --precision, no --compile)')

def edm2_image_batches(net, encoder, seeds, device, max_batch_size=32, class_idx=None, gnet=None, **sampler_kwargs):
    """Yield (batch seeds, uint8 pixels [B, C, H, W]) for this rank's batches; gnet None = the network itself (as the
    EDM2 release guides)."""
    gnet = net if gnet is None else gnet
    encoder.init(device)
    for indices in edm2_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()):
        if len(indices):
            batch_seeds = [seeds[idx] for idx in indices]
            yield batch_seeds, edm2_images(net, encoder, batch_seeds, device, class_idx=class_idx, gnet=gnet, **sampler_kwargs)

def generate_edm2_images(net, encoder, seeds, outdir, device, image_path, subdirs=False, class_idx=None, max_batch_size=32,
                         gnet=None, nfe=None, **sampler_kwargs):
    """Write this rank's images as PNGs at image_path(outdir, seed, subdirs). Decoded images must have 1 or 3 channels.
    The progress bar names `nfe`, the network evaluations per image, when given."""
    batches = edm2_image_batches(net, encoder, seeds, device, max_batch_size, class_idx=class_idx, gnet=gnet, **sampler_kwargs)
    num_batches = len(edm2_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()))
    for batch_seeds, images in tqdm.tqdm(batches, total=num_batches, unit='batch', desc=(None if nfe is None else f'NFE {nfe}'),
                                         disable=(dist.get_rank() != 0)):
        if images.shape[1] not in (1, 3):
            raise ValueError(f'the network\'s encoder decodes {images.shape[1]}-channel images; PNG files take 1 or 3')
        for seed, image in zip(batch_seeds, images.permute(0, 2, 3, 1).cpu().numpy()):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            save_image(image, path)

#----------------------------------------------------------------------------
