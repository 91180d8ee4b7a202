"""Generate random images with a trained network: one PNG per seed, using
the EDM sampler or the generalised ablation sampler, on one or many
processes (`torchrun`). The command line over training/generation.py."""

import os
import time

import click
import numpy as np

import dnnlib
from dnnlib.util import parse_int_list # re-exported, as in the reference
from torch_utils import distributed as dist
from training.generation import check_class, generate_images, image_path, num_evaluations, prepare_network
from training.image_io import read_image, save_image_grid
from training.network_io import load_network_data, load_network_pkl
from training import generation_edm2
from training.sampling import edm_sampler, ablation_sampler, StackedRandomGenerator # re-exported, as in the reference
from training.sampling_cli import check_guidance, check_guidance_options, check_sampler_range, parse_seeds, resolve_sampler, sampler_options

#----------------------------------------------------------------------------

def _barrier():
    """Wait for the other ranks; if one of them failed, stop with one line (it prints the cause)."""
    try:
        dist.barrier()
    except dist.PeerError as err:
        raise click.ClickException(str(err))

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl',  help='Network pickle filename or URL', metavar='PATH|URL',                 type=str, required=True)
@click.option('--outdir',                  help='Where to save the output images', metavar='DIR',                     type=str, required=True)
@click.option('--seeds',                   help='Random seeds (e.g. 1,2,5-10)', metavar='LIST',                       type=str, default='0-63', show_default=True)
@click.option('--subdirs',                 help='Create subdirectory for every 1000 seeds',                           is_flag=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT',                      type=int, default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',                                  type=int, default=64, show_default=True)

@sampler_options()

@click.option('--guidance',                help='Guidance weight w (1 = none)', metavar='FLOAT',                     type=float, default=1, show_default=True)
@click.option('--gnet', 'gnet_pkl',        help='Guiding network (autoguidance)  [default: classifier-free]', metavar='PATH|URL', type=str, default=None)
@click.option('--guidance-interval',       help='Guide only for noise levels in (LO, HI]', metavar='LO,HI',           type=str, default=None)

@click.option('--device',                  help='Device  [default: cuda when available, else cpu]', metavar='STR',    type=str, default=None)
@click.option('--grid',                    help='Also write a grid of all images (one white pixel apart) to this PNG', metavar='PATH', type=str, default=None)
@click.option('--grid-scale', 'grid_scale', help='Upscale each grid cell this many times (nearest neighbour)', metavar='INT', type=click.IntRange(min=1, max=64), default=1, show_default=True)
@click.option('--precision',               help='Network precision (fp32 = faithful, as the reference)',                                type=click.Choice(['fp32', 'tf32', 'bf16', 'fp16']), default='fp32', show_default=True)
@click.option('--compile', 'compile_net',  help='torch.compile the network (CUDA graphs on CUDA)',                                          is_flag=True)
@click.option('--allow-code',              help='Load a pickle that names code other than ours (runs the code it carries)',             is_flag=True)

def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, guidance, gnet_pkl, guidance_interval, device, grid, grid_scale, precision, compile_net, allow_code, **sampler_kwargs):
    """Sample one PNG per seed from a network pickle (a path or URL), with the
    EDM sampler or, given any of --solver/--disc/--schedule/--scaling, the
    generalised sampler used for the ablations of the EDM paper.

    Examples:

    \b
    # Generate 64 images and save them as out/*.png
    python generate.py --outdir=out --seeds=0-63 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Generate 1024 images using 2 GPUs
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-1023 --batch=64 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl
    """
    # Check the options that need no network.
    try:
        seeds = parse_seeds(seeds)
    except ValueError as err:
        raise click.ClickException(f'--seeds: {err}')
    try:
        sampler, sampler_kwargs = resolve_sampler(**sampler_kwargs)
        guidance_interval = check_guidance_options(guidance, gnet_pkl, guidance_interval)
    except ValueError as err:
        raise click.ClickException(str(err))
    if max_batch_size < 1:
        raise click.ClickException(f'--batch must be at least 1, got {max_batch_size}')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f'--outdir {outdir} is a file, not a directory')
    if grid is not None and os.path.isdir(grid):
        raise click.ClickException(f'--grid {grid} is a directory, not a file name')
    try:
        device = dist.init(device)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err))

    dist.print0(f'Loading network from "{network_pkl}"...')
    try:
        data = dist.rank0_first(lambda: load_network_data(network_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        net = data['ema']
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))

    gnet = None
    if gnet_pkl is not None:
        dist.print0(f'Loading guiding network from "{gnet_pkl}"...')
        try:
            gnet = dist.rank0_first(lambda: load_network_pkl(gnet_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err))

    if generation_edm2.is_edm2_network(net):
        return _generate_edm2(net, generation_edm2.default_encoder(data), gnet, seeds, outdir, subdirs, class_idx, max_batch_size,
                              guidance, guidance_interval, device, precision, compile_net, sampler, sampler_kwargs, grid, grid_scale)
    try:
        check_class(net, class_idx)
        check_sampler_range(net, sampler, sampler_kwargs)
        check_guidance(net, gnet, guidance)
    except ValueError as err:
        raise click.ClickException(str(err))

    # Generate.
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise click.ClickException(f'cannot create --outdir {outdir}: {err.strerror}')
    net = prepare_network(net, device, precision=precision, use_compile=compile_net)
    if gnet is not None:
        gnet = prepare_network(gnet, device, precision=precision, use_compile=compile_net)
    sampler_kwargs.update(gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)
    nfe = num_evaluations(sampler, **sampler_kwargs)
    dist.print0(f'Generating {len(seeds)} images to "{outdir}" with the {sampler} sampler, NFE {nfe}...')
    start_time = time.time()
    try:
        generate_images(net, seeds, outdir, device, subdirs=subdirs, class_idx=class_idx, max_batch_size=max_batch_size, sampler=sampler, **sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err))
    except OSError as err:
        raise click.ClickException(f'cannot write {err.filename}: {err.strerror}')
    _barrier()
    _write_grid_and_finish(outdir, seeds, subdirs, grid, grid_scale, max(time.time() - start_time, 1e-6), nfe)

def _write_grid_and_finish(outdir, seeds, subdirs, grid, grid_scale, elapsed, nfe):
    """Rank 0 tiles all images, in seed order, into one grid; the closing line."""
    if grid is not None and dist.get_rank() == 0:
        try:
            save_image_grid(np.stack([read_image(image_path(outdir, seed, subdirs)) for seed in seeds]), grid, scale=grid_scale, gap=grid_scale)
        except OSError as err:
            raise click.ClickException(f'cannot write --grid {grid}: {err.strerror or err}')
    _barrier()
    dist.print0(f'Wrote {len(seeds)} images to "{outdir}"' + (f' and a grid to "{grid}"' if grid is not None else '') +
                f' in {dnnlib.util.format_time(elapsed)} ({len(seeds) / elapsed:.2f} images/s, NFE {nfe}).')
    dist.finish()

#----------------------------------------------------------------------------
# EDM2 networks: the EDM2 release's sampler, its defaults (32 steps unless --steps is given) and decoding.

def _generate_edm2(net, encoder, gnet, seeds, outdir, subdirs, class_idx, max_batch_size, guidance, guidance_interval,
                   device, precision, compile_net, sampler, sampler_kwargs, grid, grid_scale):
    if sampler == 'edm':
        sampler_kwargs = generation_edm2.edm2_sampler_kwargs(net, **sampler_kwargs)
    try:
        check_class(net, class_idx)
        generation_edm2.check_edm2_options(sampler, sampler_kwargs, guidance_interval, precision, compile_net)
        os.makedirs(outdir, exist_ok=True)
        net, gnet = net.to(device), (gnet.to(device) if gnet is not None else None)
        if guidance_interval is not None:
            sampler_kwargs['guidance_interval'] = guidance_interval
        nfe = num_evaluations(sampler, **sampler_kwargs)
        name = 'the EDM2 release\'s' if sampler == 'edm' else f'the {sampler}'
        dist.print0(f'Generating {len(seeds)} images to "{outdir}" with {name} sampler, NFE {nfe}...')
        start_time = time.time()
        generation_edm2.generate_edm2_images(net, encoder, seeds, outdir, device, image_path, subdirs=subdirs, class_idx=class_idx,
                                             max_batch_size=max_batch_size, gnet=gnet, guidance=guidance, sampler=sampler, nfe=nfe, **sampler_kwargs)
    except (ValueError, ImportError) as err:
        raise click.ClickException(str(err))
    except OSError as err:
        raise click.ClickException(f'cannot write {err.filename}: {err.strerror}')
    _barrier()
    _write_grid_and_finish(outdir, seeds, subdirs, grid, grid_scale, max(time.time() - start_time, 1e-6), nfe)

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
