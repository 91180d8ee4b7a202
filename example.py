"""Minimal standalone example: an 8x8 grid of images from each published EDM
model, sampled with edm_sampler at the settings the paper recommends for it."""

import os

import click
import torch

from torch_utils.misc import choose_device
from training.image_io import images_to_uint8, save_image_grid
from training.network_io import load_network_pkl
from training.sampling import edm_sampler

MODEL_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'

# (network pickle, grid file, edm_sampler settings)
MODELS = [
    ('edm-cifar10-32x32-cond-vp.pkl',   'cifar10-32x32.png',  dict(num_steps=18)), # FID = 1.79, NFE = 35
    ('edm-ffhq-64x64-uncond-vp.pkl',    'ffhq-64x64.png',     dict(num_steps=40)), # FID = 2.39, NFE = 79
    ('edm-afhqv2-64x64-uncond-vp.pkl',  'afhqv2-64x64.png',   dict(num_steps=40)), # FID = 1.96, NFE = 79
    ('edm-imagenet-64x64-cond-adm.pkl', 'imagenet-64x64.png', dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)), # FID = 1.36, NFE = 511
]

#----------------------------------------------------------------------------

@torch.no_grad()
def generate_image_grid(network_pkl, dest_path, seed=0, gridw=8, gridh=8, device=None, allow_code=False, **sampler_kwargs):
    """Sample gridw x gridh images with edm_sampler and write them as one PNG grid."""
    device = choose_device(device)
    batch_size = gridw * gridh
    gen = torch.Generator(device).manual_seed(seed)

    # Load network.
    print(f'Loading network from "{network_pkl}"...')
    net = load_network_pkl(network_pkl, allow_code=allow_code).to(device)

    # Pick latents and labels.
    print(f'Generating {batch_size} images...')
    latents = torch.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], generator=gen, device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[torch.randint(net.label_dim, size=[batch_size], generator=gen, device=device)]

    # Sample; the churn noise comes from the same generator.
    randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
    images = edm_sampler(net, latents, class_labels, randn_like=randn_like, **sampler_kwargs)

    # Save image grid.
    print(f'Saving image grid to "{dest_path}"...')
    save_image_grid(images_to_uint8(images), dest_path, grid_size=(gridw, gridh))

#----------------------------------------------------------------------------

@click.command()
@click.option('--device',     help='Device  [default: cuda when available, else cpu]', metavar='STR',  type=str, default=None)
@click.option('--model-root', help='Folder or URL holding the published pickles', metavar='PATH|URL', type=str, default=MODEL_ROOT, show_default=True)
@click.option('--outdir',     help='Where to save the image grids', metavar='DIR',                     type=str, default='.', show_default=True)
@click.option('--allow-code', help='Load pickles that name code other than ours (runs the code they carry)', is_flag=True)
def main(device, model_root, outdir, allow_code):
    """Write an 8x8 image grid for each published EDM model (CIFAR-10, FFHQ, AFHQv2, ImageNet)."""
    for pkl, grid_name, sampler_kwargs in MODELS:
        network_pkl = model_root.rstrip('/') + '/' + pkl
        try:
            generate_image_grid(network_pkl, os.path.join(outdir, grid_name), device=device, allow_code=allow_code, **sampler_kwargs)
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err))
    print('Done.')

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
