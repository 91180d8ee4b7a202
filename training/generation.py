"""Sampling many seeds: the network prepared for the samplers at a chosen
precision, seeds split into batches over processes, latents and labels per
seed, and one PNG per seed. generate.py and fid.py are command lines over it."""

import concurrent.futures
import contextlib
import copy
import os

import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from training.image_io import images_to_uint8, save_image
from training.network_io import rebuild_network
from training.fast_layers import set_fast_paths
from training.sampling import edm_sampler, ablation_sampler, StackedRandomGenerator, latents_and_labels
from training import solvers

SAMPLERS = {'edm': edm_sampler, 'ablation': ablation_sampler, **solvers.SOLVERS} # by the names of sample_batches
ABLATION_OPTIONS = ('solver', 'discretization', 'schedule', 'scaling') # without a sampler name, any of these selects ablation_sampler
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}

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
        self.on_call = on_call          # Called with the output after each network evaluation (progress), or None.
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
            self.on_call(out)
        return out

def _reporting(net, device_type, on_call):
    """A copy of `net` as a SamplerNet that also calls on_call after each network evaluation."""
    net = copy.copy(net) if isinstance(net, SamplerNet) else SamplerNet(net, device_type)
    previous = net.on_call
    net.on_call = on_call if previous is None else (lambda out: (previous(out), on_call(out)))
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

def sampler_name(sampler, sampler_kwargs):
    """`sampler`, or when None the reference's choice: 'ablation' when any ablation option is set, else 'edm'."""
    if sampler is None:
        return 'ablation' if any(sampler_kwargs.get(key) is not None for key in ABLATION_OPTIONS) else 'edm'
    if sampler not in SAMPLERS:
        raise ValueError(f'unknown sampler {sampler!r}; choose one of {", ".join(SAMPLERS)}')
    return sampler

def num_evaluations(sampler, num_steps=18, solver='heun', max_order=None, afs=False, denoise_to_zero=False, sigmas=None, **_other):
    """Network evaluations per image of a sampler of SAMPLERS with these arguments (a guided step counts once)."""
    if sampler == 'ablation':
        return num_steps if solver == 'euler' else 2 * num_steps - 1
    return solvers.num_evaluations(sampler, num_steps if sigmas is None else len(sigmas), max_order, afs, denoise_to_zero)

@torch.no_grad()
def sample_batches(net, seeds, device, class_idx=None, max_batch_size=64, progress=False, sampler=None, **sampler_kwargs):
    """Yield (batch_seeds, uint8 images [B, H, W, C]) for this rank's batches; each image depends only on its seed.
    `sampler` names one of SAMPLERS; None: edm_sampler, or ablation_sampler when any ablation option is given.
    Unset (None) sampler options are not passed. A SamplerNet with pad_batches runs smaller batches padded with
    copies of their last seed. With `progress`, rank 0 shows a bar that advances with each network evaluation."""
    check_class(net, class_idx)
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    sampler = sampler_name(sampler, sampler_kwargs)
    sampler_fn = SAMPLERS[sampler]
    rank_batches = [batch for batch in split_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()) if len(batch) > 0]
    padded_size = max(map(len, rank_batches), default=0) if getattr(net, 'pad_batches', False) else 0
    # Progress in network evaluations per image: guidance adds D0's (in the same call for classifier-free guidance).
    nfe = num_evaluations(sampler, **sampler_kwargs)
    guided = sampler_kwargs.get('guidance', 1) != 1
    run_size = [1] # images of the batch being sampled
    with tqdm.tqdm(total=nfe * (2 if guided else 1) * len(rank_batches), unit='eval', desc=f'NFE {nfe}',
                   disable=(not progress or dist.get_rank() != 0)) as bar:
        if not bar.disable:
            count = lambda out: bar.update(out.shape[0] // run_size[0])
            net = _reporting(net, device.type, count)
            if sampler_kwargs.get('gnet') is not None:
                sampler_kwargs['gnet'] = _reporting(sampler_kwargs['gnet'], device.type, count)
        for batch_seeds, images in _sample_rank_batches(net, rank_batches, padded_size, device, class_idx, sampler_fn, sampler_kwargs, run_size):
            yield batch_seeds, images
        if not bar.disable and bar.n < bar.total: # fewer outside a guidance interval
            bar.total = bar.n
            bar.refresh()

def _sample_rank_batches(net, rank_batches, padded_size, device, class_idx, sampler_fn, sampler_kwargs, run_size_out=None):
    """The body of sample_batches: sample each non-empty batch of seeds, padded to padded_size (its size into run_size_out[0])."""
    for batch_seeds in rank_batches:
        batch_size = len(batch_seeds)
        run_seeds = batch_seeds + batch_seeds[-1:] * (padded_size - batch_size) # the padding's images are dropped
        run_size = len(run_seeds)
        if run_size_out is not None:
            run_size_out[0] = run_size

        rnd = StackedRandomGenerator(device, run_seeds)
        latents, class_labels = latents_and_labels(net, rnd, device, class_idx)

        images = sampler_fn(net, latents, class_labels, randn_like=rnd.randn_like, **sampler_kwargs)
        yield batch_seeds, images_to_uint8(images[:batch_size])

def _save_images(images, paths):
    for image, path in zip(images, paths):
        try:
            save_image(image, path)
        except OSError as err: # name the image, not its temporary file
            err.filename, err.filename2 = path, None
            raise

def generate_images(net, seeds, outdir, device, subdirs=False, class_idx=None, max_batch_size=64, sampler=None, **sampler_kwargs):
    """Write this rank's images as outdir/{seed:06d}.png (see sample_batches). A thread writes
    each batch while the next one samples; at most one batch waits, and its errors surface here."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for batch_seeds, images in sample_batches(net, seeds, device, class_idx=class_idx, max_batch_size=max_batch_size, progress=True,
                                                       sampler=sampler, **sampler_kwargs):
            if pending is not None:
                pending.result()
            pending = writer.submit(_save_images, images, [image_path(outdir, seed, subdirs) for seed in batch_seeds])
        if pending is not None:
            pending.result()

#----------------------------------------------------------------------------
