"""Generate random images with a trained network: one PNG per seed, using
the EDM sampler or the generalised ablation sampler, on one or many
processes (`torchrun`)."""

import concurrent.futures
import contextlib
import copy
import math
import os
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training.network_io import load_network_pkl, rebuild_network
from training.networks import set_fast_paths
from training.sampling import edm_sampler, ablation_sampler, StackedRandomGenerator # re-exported, as in the reference
from training.sampling import check_guidance, check_sampler_options, num_evaluations, parse_guidance_interval, parse_seeds

ABLATION_OPTIONS = ('solver', 'discretization', 'schedule', 'scaling') # any of these selects ablation_sampler
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}

#----------------------------------------------------------------------------
# Images and image grids (also used by example.py).

def images_to_uint8(images):
    """[N, C, H, W] images in [-1, 1] -> uint8 numpy [N, H, W, C] (pixel = clip(x * 127.5 + 128, 0, 255))."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_image(image, path):
    """Write one uint8 [H, W, C] image as a PNG ('L' for one channel, else 'RGB'), atomically."""
    picture = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with dnnlib.util.atomic_path(path) as tmp:
        picture.save(tmp, format='PNG')

def read_image(path):
    """uint8 [H, W, C] pixels of an image file."""
    with PIL.Image.open(path) as picture:
        image = np.array(picture)
    return image.reshape(*image.shape[:2], -1)

def grid_size_for(num_images):
    """(grid_w, grid_h) as close to square as possible, e.g. 64 -> (8, 8), 6 -> (3, 2)."""
    grid_w = max(math.ceil(math.sqrt(num_images)), 1)
    return grid_w, max(math.ceil(num_images / grid_w), 1)

def save_image_grid(images, path, grid_size=None, scale=1, gap=0):
    """Write uint8 [N, H, W, C] images as one PNG, in rows of grid_w (empty cells black), atomically.
    Each image is upscaled `scale` times (nearest neighbour); `gap` white pixels separate the cells."""
    images = np.asarray(images)
    grid_w, grid_h = grid_size if grid_size is not None else grid_size_for(len(images))
    if len(images) > grid_w * grid_h:
        raise ValueError(f'{len(images)} images do not fit a {grid_w}x{grid_h} grid')
    if int(scale) != scale or scale < 1 or int(gap) != gap or gap < 0:
        raise ValueError(f'grid scale must be a positive integer and gap a non-negative one, got {scale!r} and {gap!r}')
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    _N, H, W, C = images.shape
    cells = np.zeros([grid_h * grid_w, H, W, C], dtype=np.uint8)
    cells[:len(images)] = images
    grid = np.full([grid_h, H + gap, grid_w, W + gap, C], 255, dtype=np.uint8)
    grid[:, :H, :, :W] = cells.reshape(grid_h, grid_w, H, W, C).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(grid_h * (H + gap), grid_w * (W + gap), C)[:grid_h * (H + gap) - gap, :grid_w * (W + gap) - gap]
    save_image(np.ascontiguousarray(grid), path)

#----------------------------------------------------------------------------
# The network as the samplers see it, at the chosen precision.

def _freezing(enabled):
    """Context in which torch.compile, which compiles in the first call, takes the weights as constants.
    (torch.compile's own options do not reach inductor's freezing.)"""
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config # pylint: disable=import-outside-toplevel
    return inductor_config.patch(freezing=True)

class SamplerNet:
    """Calls `net` under torch.autocast (when `dtype` is given) and reports each call; other attributes are the network's."""

    def __init__(self, net, device_type, dtype=None, on_call=None, pad_batches=False, freeze=False):
        self.net = net                  # Network (or its torch.compile wrapper).
        self.device_type = device_type  # 'cpu' | 'cuda' | ...
        self.dtype = dtype              # Autocast dtype, or None for the network's own precision.
        self.on_call = on_call          # Called after each network evaluation (progress), or None.
        self.pad_batches = pad_batches  # Give every batch the same size (a compiled network then compiles once)?
        self.freeze = freeze            # Compile the weights in as constants (inductor's freezing)?

    def __getattr__(self, name):
        if name == 'net':
            raise AttributeError(name)
        return getattr(self.net, name)

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=(self.dtype is not None)), _freezing(self.freeze):
            out = self.net(*args, **kwargs)
        if self.on_call is not None:
            self.on_call()
        return out

def _reporting(net, device_type, on_call):
    """A copy of `net` as a SamplerNet that also calls on_call after each network evaluation."""
    net = copy.copy(net) if isinstance(net, SamplerNet) else SamplerNet(net, device_type)
    previous = net.on_call
    net.on_call = on_call if previous is None else (lambda: (previous(), on_call()))
    return net

def prepare_network(net, device, precision='fp32', use_compile=False, freeze=True):
    """Move `net` to `device` for sampling at the given precision and wrap it for the samplers.

    fp32 = float32 with PyTorch's default TF32 use, as the reference samples; tf32 = TF32 matmuls too;
    bf16/fp16 = autocast with float32 weights, except fp16 without compilation on CUDA, which runs the
    network's own float16 path (use_fp16, as the reference trains with --fp16=1). Reduced precision and
    compilation rebuild the network from our classes (published pickles too) with the fast operations of
    set_fast_paths; compilation also makes the weights channels-last and, with `freeze` on CUDA, compiles
    them in as constants (inductor's freezing): they must not change after the first call.
    """
    if precision not in ('fp32', 'tf32', *AUTOCAST_DTYPES):
        raise ValueError(f'unknown precision {precision!r}; choose one of fp32, tf32, {", ".join(AUTOCAST_DTYPES)}')
    if device.type == 'cuda':
        # fp32 keeps PyTorch's defaults, with which the reference samples: cuDNN may use TF32 for convolutions,
        # matmuls stay float32 (NVIDIA_TF32_OVERRIDE=0 forces strict float32); tf32 also allows it for matmuls.
        torch.backends.cuda.matmul.allow_tf32 = (precision == 'tf32')
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True # the fastest convolution algorithms for the fixed batch shape
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None or use_compile:
        net = rebuild_network(net)
        if type(net).__module__ == 'training.networks':
            set_fast_paths(net) # SDPA attention, pooling for the [1,1] resampling filter, in-place group statistics
    if use_compile:
        # Channels-last only pays under torch.compile: eager group_norm on CUDA converts such inputs back to NCHW.
        net = net.to(memory_format=torch.channels_last)
    elif precision == 'fp16' and device.type == 'cuda' and hasattr(net, 'use_fp16'):
        net.use_fp16 = True # float16 activations throughout: half the memory traffic of autocast's float32 norms
        dtype = None
    net = net.to(device)
    if use_compile:
        # On CUDA, 'reduce-overhead' replays the network as CUDA graphs (the samplers copy each output at once).
        net = torch.compile(net, mode=('reduce-overhead' if device.type == 'cuda' else None))
    # Sampling never changes the weights. Frozen, their casts to the autocast dtype are made once rather than
    # in every call (172 small kernels per CIFAR-10 DDPM++ evaluation, a third of its kernels on CUDA). Not on
    # CPUs: there freezing also packs the weights for oneDNN, which changed float32 outputs by 7e-2 (torch 2.13).
    freeze = use_compile and freeze and device.type == 'cuda'
    return SamplerNet(net, device.type, dtype=dtype, pad_batches=use_compile, freeze=freeze)

#----------------------------------------------------------------------------

def split_batches(seeds, max_batch_size, rank, world_size):
    """This rank's batches: the seeds split into batches of at most max_batch_size per process, dealt round-robin."""
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)
    return [batch.tolist() for batch in all_batches[rank :: world_size]]

def image_path(outdir, seed, subdirs=False):
    """Where the image of `seed` goes: outdir/{seed:06d}.png, or in a folder per 1000 seeds."""
    image_dir = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(image_dir, f'{seed:06d}.png')

def check_class(net, class_idx):
    """Raise ValueError unless `class_idx` is None or a valid class of `net`."""
    if class_idx is not None and not net.label_dim:
        raise ValueError(f'--class={class_idx} given, but the network is unconditional')
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise ValueError(f'--class={class_idx} is out of range: the network has {net.label_dim} classes (0-{net.label_dim - 1})')

@torch.no_grad()
def sample_batches(net, seeds, device, class_idx=None, max_batch_size=64, progress=False, **sampler_kwargs):
    """Yield (batch_seeds, uint8 images [B, H, W, C]) for this rank's batches; each image depends only on its seed.
    Unset (None) sampler options are not passed; any ablation option selects ablation_sampler.
    A SamplerNet with pad_batches runs smaller batches padded with copies of their last seed.
    With `progress`, rank 0 shows a bar that advances with each network evaluation."""
    check_class(net, class_idx)
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    check_sampler_options(net.sigma_min, net.sigma_max, **sampler_kwargs)
    sampler_fn = ablation_sampler if any(key in sampler_kwargs for key in ABLATION_OPTIONS) else edm_sampler
    rank_batches = [batch for batch in split_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()) if len(batch) > 0]
    padded_size = max(map(len, rank_batches), default=0) if getattr(net, 'pad_batches', False) else 0
    nfe = num_evaluations(sampler_kwargs.get('num_steps', 18), sampler_kwargs.get('solver', 'heun'))
    with tqdm.tqdm(total=nfe * len(rank_batches), unit='eval', disable=(not progress or dist.get_rank() != 0)) as bar:
        if not bar.disable:
            net = _reporting(net, device.type, lambda: bar.update(1))
        yield from _sample_rank_batches(net, rank_batches, padded_size, device, class_idx, sampler_fn, sampler_kwargs)

def _sample_rank_batches(net, rank_batches, padded_size, device, class_idx, sampler_fn, sampler_kwargs):
    """The body of sample_batches: sample each non-empty batch of seeds, padded to padded_size."""
    # Without churn, edm_sampler multiplies each step's noise by sqrt(t_hat^2 - t_i^2) = 0 (t_hat = round_sigma(t_i),
    # and round_sigma is idempotent), and the batch's generators are dropped after it: zeros give the same images
    # without one draw per seed and step (256 small kernels per step on a GPU).
    no_churn = (sampler_fn is edm_sampler and sampler_kwargs.get('S_churn', 0) == 0)
    for batch_seeds in rank_batches:
        batch_size = len(batch_seeds)
        run_seeds = batch_seeds + batch_seeds[-1:] * (padded_size - batch_size) # the padding's images are dropped
        run_size = len(run_seeds)

        # Pick latents and labels; labels are drawn after the latents, also when --class overrides them.
        rnd = StackedRandomGenerator(device, run_seeds)
        latents = rnd.randn([run_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        class_labels = None
        if net.label_dim:
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[run_size], device=device)]
        if class_idx is not None:
            class_labels[:, :] = 0
            class_labels[:, class_idx] = 1

        randn_like = torch.zeros_like if no_churn else rnd.randn_like
        images = sampler_fn(net, latents, class_labels, randn_like=randn_like, **sampler_kwargs)
        yield batch_seeds, images_to_uint8(images[:batch_size])

def _save_images(images, paths):
    for image, path in zip(images, paths):
        try:
            save_image(image, path)
        except OSError as err: # name the image, not its temporary file
            err.filename, err.filename2 = path, None
            raise

def generate_images(net, seeds, outdir, device, subdirs=False, class_idx=None, max_batch_size=64, **sampler_kwargs):
    """Write this rank's images as outdir/{seed:06d}.png (see sample_batches). A thread writes
    each batch while the next one samples; at most one batch waits, and its errors surface here."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for batch_seeds, images in sample_batches(net, seeds, device, class_idx=class_idx, max_batch_size=max_batch_size, progress=True, **sampler_kwargs):
            if pending is not None:
                pending.result()
            pending = writer.submit(_save_images, images, [image_path(outdir, seed, subdirs) for seed in batch_seeds])
        if pending is not None:
            pending.result()

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

@click.option('--steps', 'num_steps',      help='Number of sampling steps', metavar='INT',                            type=int, default=18, show_default=True)
@click.option('--sigma_min',               help='Lowest noise level  [default: varies]', metavar='FLOAT',             type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',               help='Highest noise level  [default: varies]', metavar='FLOAT',            type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                     help='Time step exponent', metavar='FLOAT',                                type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', 'S_churn',      help='Stochasticity strength', metavar='FLOAT',                            type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min',          help='Stoch. min noise level', metavar='FLOAT',                            type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max',          help='Stoch. max noise level', metavar='FLOAT',                            type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise',      help='Stoch. noise inflation', metavar='FLOAT',                            type=float, default=1, show_default=True)

@click.option('--solver',                  help='Ablate ODE solver', metavar='euler|heun',                            type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization',  help='Ablate time step discretization {t_i}', metavar='vp|ve|iddpm|edm', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',                help='Ablate noise schedule sigma(t)', metavar='vp|ve|linear',             type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                 help='Ablate signal scaling s(t)', metavar='vp|none',                      type=click.Choice(['vp', 'none']))

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
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    try:
        check_sampler_options(**sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err))
    if max_batch_size < 1:
        raise click.ClickException(f'--batch must be at least 1, got {max_batch_size}')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.ClickException(f'--outdir {outdir} is a file, not a directory')
    if grid is not None and os.path.isdir(grid):
        raise click.ClickException(f'--grid {grid} is a directory, not a file name')
    try:
        guidance_interval = parse_guidance_interval(guidance_interval)
    except ValueError as err:
        raise click.ClickException(str(err))
    try:
        device = dist.init(device)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err))

    dist.print0(f'Loading network from "{network_pkl}"...')
    try:
        net = dist.rank0_first(lambda: load_network_pkl(network_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))

    gnet = None
    if gnet_pkl is not None:
        dist.print0(f'Loading guiding network from "{gnet_pkl}"...')
        try:
            gnet = dist.rank0_first(lambda: load_network_pkl(gnet_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err))

    try:
        check_class(net, class_idx)
        check_sampler_options(net.sigma_min, net.sigma_max, **sampler_kwargs)
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
    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    start_time = time.time()
    try:
        generate_images(net, seeds, outdir, device, subdirs=subdirs, class_idx=class_idx, max_batch_size=max_batch_size, **sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err))
    except OSError as err:
        raise click.ClickException(f'cannot write {err.filename}: {err.strerror}')
    _barrier()
    elapsed = max(time.time() - start_time, 1e-6)

    # Rank 0 tiles all images, in seed order, into one grid.
    if grid is not None and dist.get_rank() == 0:
        try:
            save_image_grid(np.stack([read_image(image_path(outdir, seed, subdirs)) for seed in seeds]), grid, scale=grid_scale, gap=grid_scale)
        except OSError as err:
            raise click.ClickException(f'cannot write --grid {grid}: {err.strerror or err}')
    _barrier()
    dist.print0(f'Wrote {len(seeds)} images to "{outdir}"' + (f' and a grid to "{grid}"' if grid is not None else '') +
                f' in {dnnlib.util.format_time(elapsed)} ({len(seeds) / elapsed:.2f} images/s).')
    dist.finish()

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main()

#----------------------------------------------------------------------------
