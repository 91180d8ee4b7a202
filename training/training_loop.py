"""Main training loop: data, network, optimiser, EMA, ticks, snapshots,
state dumps and exact resumption.

training_loop() tells the story: set up (numerics, batch split, resume state,
data, network), then TrainingStep (accumulation rounds, optimizer step with
the loss scale, EMA update) until done, with maintenance once per tick
(_report_tick, _save_snapshot with its sample grid, the state dump,
_update_logs). What the training state holds, how it is written and how a run
resumes from it: training/training_state.py; stop requests:
training/stop_request.py."""

import atexit
import copy
import inspect
import json
import os
import pickle
import signal
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import safetensors_io, training_state
from training.image_io import images_to_uint8, save_image_grid
from training.loss_scale import DynamicLossScale
from training.fast_layers import set_fast_paths
from training.phema import PowerFunctionEMA
from training.generation_edm2 import default_encoder, edm2_images, is_edm2_network
from training.sampling import edm_sampler, StackedRandomGenerator, latents_and_labels
from training.stop_request import StopRequest, agree_to_stop
from training.training_state import load_state_dump # pylint: disable=unused-import # also importable from here

#----------------------------------------------------------------------------
# Out-of-memory errors of every supported torch version.

_OOM_ERRORS = tuple({getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})

def _oom_message(batch_gpu, num_accumulation_rounds):
    return (f'out of GPU memory with a per-GPU batch of {batch_gpu} images ({num_accumulation_rounds} accumulation rounds): '
            f'lower --batch-gpu (the batch is then split into more accumulation rounds)')

#----------------------------------------------------------------------------
# Data.

def _worker_init(_worker_id):
    # Data loader workers leave SIGINT/SIGTERM to the main process, which stops cleanly (and stops them: _close_data_loader).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def _close_data_loader(iterator):
    """Stop the data loader's worker processes now, on every way out of the loop. Left to the interpreter's exit, which
    skips the loader's own shutdown and sends them the SIGTERM they ignore, an error would wait for them forever."""
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown() # asks each worker to finish, and waits a few seconds
    for worker in getattr(iterator, '_workers', []):
        if worker.is_alive():
            worker.kill()
            worker.join()

def _next_batch(iterator):
    """The next (images, labels). A worker's error arrives with the worker's traceback in its message; keep the
    error's own last line (the dataset's names the file)."""
    try:
        return next(iterator)
    except (ValueError, OSError, RuntimeError, TypeError, KeyError, IndexError) as err:
        text = str(err)
        if 'Original Traceback' not in text:
            raise
        last = text.strip().splitlines()[-1]
        kind, _, message = last.partition(': ')
        raise ValueError(message if message and kind.isidentifier() else last) from None

#----------------------------------------------------------------------------
# Multi-process training.

def _wrap_ddp(net, device):
    """DistributedDataParallel with every rank starting from rank 0's parameters *and* buffers
    (random buffers such as Fourier frequencies included), without syncing buffers at each forward."""
    with torch.no_grad():
        for tensor in misc.params_and_buffers(net):
            torch.distributed.broadcast(tensor, src=0)
    ddp_kwargs = dict(device_ids=[device] if device.type == 'cuda' else None)
    if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters:
        ddp_kwargs['forward_sync_buffers'] = False # torch >= 2.13 deprecates broadcast_buffers
    else:
        ddp_kwargs['broadcast_buffers'] = False
    return torch.nn.parallel.DistributedDataParallel(net, **ddp_kwargs)

#----------------------------------------------------------------------------
# Speed options.

_PRECISIONS = ('fp32', 'tf32', 'bf16')

def fused_adam_kwargs(optimizer_kwargs, device):
    """dict(fused=True) where the optimizer is Adam and PyTorch has its fused kernel for `device` (CUDA;
    the CPU from PyTorch 2.4): one pass over the parameters, and a float16 step skipped on the device."""
    if optimizer_kwargs.get('class_name') != 'torch.optim.Adam':
        return {}
    try:
        torch.optim.Adam([torch.zeros([1], device=device, requires_grad=True)], fused=True)
    except RuntimeError:
        return {}
    return dict(fused=True)

#----------------------------------------------------------------------------
# Network snapshots.

def _snapshot_data(ema, loss_fn, augment_pipe, dataset_kwargs, check_consistency=False, encoder=None):
    """What a network snapshot holds: the faithful EMA network, loss and augmentation (copies, eval, on the CPU);
    EDM2 runs add the `encoder` that decodes the network's output to pixels, as EDM2 pickles hold it."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
    if encoder is not None:
        data['encoder'] = encoder
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            value = copy.deepcopy(value).eval().requires_grad_(False)
            set_fast_paths(value, False) # snapshots always hold the faithful network
            value = value.to(memory_format=torch.contiguous_format)
            if check_consistency:
                misc.check_ddp_consistency(value)
            data[key] = value.cpu()
        del value # conserve memory
    return data

def _finish_complete_run(run_dir, state, resume_state_dump, cur_nimg, total_kimg, kwargs):
    """Resuming a state that already reaches total_kimg trains nothing; a run stopped between its last state dump and
    its last snapshot gets that snapshot, from the state's EMA (the network it would have held). `kwargs` holds
    loss_kwargs, augment_kwargs, dataset_kwargs and encoder_kwargs."""
    label = os.path.basename(resume_state_dump)[len('training-state-'):-len('.pt')]
    snapshot_path = training_state.snapshot_path(run_dir, label) if run_dir is not None else None
    if snapshot_path is not None and not os.path.isfile(snapshot_path) and state.get('ema') is not None:
        loss_fn = dnnlib.util.construct_class_by_name(**kwargs['loss_kwargs'])
        augment_kwargs = kwargs['augment_kwargs']
        augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
        encoder_kwargs = kwargs.get('encoder_kwargs')
        encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs) if encoder_kwargs else None
        training_state.write_file(snapshot_path, pickle.dump, _snapshot_data(state['ema'], loss_fn, augment_pipe, kwargs['dataset_kwargs'], encoder=encoder))
        dist.print0(f'Wrote the missing final snapshot {snapshot_path}')
    dist.print0(f'Training is already complete: {resume_state_dump} is at {cur_nimg / 1000:g} kimg of {total_kimg} kimg (--duration); nothing to train.')

#----------------------------------------------------------------------------
# One training step.

class TrainingStep:
    """One training step: the gradients of batch_size images (over all processes), accumulated in rounds;
    the optimizer step with the learning rate ramp-up (float16 EDM networks: with the dynamic loss scale); the
    EMA update. `step(next_batch, cur_nimg)` runs it, next_batch() giving (images in [-1, 1], labels) on the
    device. The training loop and bench/bench.py both run this."""

    def __init__(self,
        net,                                # Network being trained (unwrapped).
        ema,                                # Its exponential moving average (a copy of net).
        loss_fn,                            # training.loss.(VP|VE|EDM)Loss.
        optimizer,                          # Optimizer of net's parameters.
        batch_size,                         # Images of one step, over all processes.
        lr,                                 # Learning rate after the ramp-up.
        num_accumulation_rounds = 1,        # Rounds per step; each process sees batch_size // world_size images per step.
        augment_pipe            = None,     # training.augment.AugmentPipe, None = disable.
        ddp                     = None,     # net in DistributedDataParallel, None = single process.
        train_net               = None,     # What the loss calls (ddp, possibly compiled), None = ddp.
        loss_scale              = None,     # DynamicLossScale for float16 networks, None = the fixed loss_scaling.
        loss_scaling            = 1,        # Fixed loss scale.
        lr_rampup_kimg          = 0,        # Learning rate ramp-up duration.
        ema_halflife_kimg       = 500,      # Half-life of the EMA.
        ema_rampup_ratio        = 0.05,     # EMA ramp-up coefficient, None = no rampup.
        precision               = 'fp32',   # bf16 = autocast.
        fast                    = False,    # One fused kernel per parameter group for the EMA.
        phema                   = None,     # training.phema.PowerFunctionEMA, None = disable.
        lr_kwargs               = None,     # Learning rate schedule lr(cur_nimg, batch_size) by func_name (EDM2), None = lr with the ramp-up.
        encoder                 = None,     # Encoder of an EDM2 run, kept for its snapshots (the data is in [-1, 1] either way).
        nonfinite_grad          = 1e5,      # Infinite gradients become +-this before the step (the reference: 1e5; EDM2: 0); NaN become 0.
    ):
        self.net, self.ema, self.loss_fn, self.optimizer, self.augment_pipe = net, ema, loss_fn, optimizer, augment_pipe
        self.ddp = ddp if ddp is not None else net
        self.train_net = train_net if train_net is not None else self.ddp
        self.batch_size, self.lr, self.num_accumulation_rounds = batch_size, lr, num_accumulation_rounds
        self.batch_gpu_total = batch_size // dist.get_world_size()
        self.batch_gpu = self.batch_gpu_total // num_accumulation_rounds
        self.loss_scale, self.loss_scaling, self.lr_rampup_kimg = loss_scale, loss_scaling, lr_rampup_kimg
        self.ema_halflife_kimg, self.ema_rampup_ratio, self.fast, self.phema = ema_halflife_kimg, ema_rampup_ratio, fast, phema
        self.lr_kwargs, self.encoder, self.nonfinite_grad = (dict(lr_kwargs) if lr_kwargs else None), encoder, nonfinite_grad
        self.autocast_dtype = torch.bfloat16 if precision == 'bf16' else None
        device = next(net.parameters()).device
        self.loss_sum = torch.zeros([], dtype=torch.float64, device=device) # this rank's loss sum of the tick: read once per tick
        self.loss_num = 0

    def __call__(self, next_batch, cur_nimg):
        """One step taken at cur_nimg images of training."""
        self.accumulate_gradients(next_batch)
        self.update_weights(cur_nimg)
        self.update_ema(cur_nimg)

    def accumulate_gradients(self, next_batch):
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.loss_scale.scale if self.loss_scale is not None else self.loss_scaling
        device_type = self.loss_sum.device.type
        try:
            for round_idx in range(self.num_accumulation_rounds):
                with misc.ddp_sync(self.ddp, (round_idx == self.num_accumulation_rounds - 1)):
                    images, labels = next_batch()
                    with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=(self.autocast_dtype is not None)):
                        loss = self.loss_fn(net=self.train_net, images=images, labels=labels, augment_pipe=self.augment_pipe)
                    training_stats.report('Loss/loss', loss)
                    self.loss_sum.add_(loss.detach().sum().to(self.loss_sum))
                    self.loss_num += loss.numel()
                    loss.sum().mul(scale / self.batch_gpu_total).backward() # the per-GPU total, not one round's size
        except _OOM_ERRORS:
            raise MemoryError(_oom_message(self.batch_gpu, self.num_accumulation_rounds)) from None

    def update_weights(self, cur_nimg):
        """Optimizer step; float16: a step whose gradients overflowed is skipped (the others are all finite)."""
        if self.lr_kwargs is not None:
            lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=self.batch_size, **self.lr_kwargs)
        else:
            lr = self.lr * min(cur_nimg / max(self.lr_rampup_kimg * 1000, 1e-8), 1)
        for g in self.optimizer.param_groups:
            g['lr'] = lr
        if self.loss_scale is not None:
            training_stats.report('Loss/skipped_step', self.loss_scale.step(self.optimizer, self.net.parameters()))
            return
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=self.nonfinite_grad, neginf=-self.nonfinite_grad, out=param.grad)
        self.optimizer.step()

    def update_ema(self, cur_nimg):
        ema_halflife_nimg = self.ema_halflife_kimg * 1000
        if self.ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * self.ema_rampup_ratio)
        ema_beta = 0.5 ** (self.batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            if self.fast: # one fused kernel per parameter group; equal up to float rounding
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - ema_beta)
            else:
                for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
                    p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
        if self.phema is not None:
            self.phema.update(self.net, nimg=cur_nimg + self.batch_size, batch_size=self.batch_size)

    def take_mean_loss(self):
        """This process's mean loss since the last call."""
        mean = float(self.loss_sum) / max(self.loss_num, 1)
        self.loss_sum.zero_()
        self.loss_num = 0
        return mean

#----------------------------------------------------------------------------
# Setting up: numerics, batch split, resume state, data, network.

def _set_up_numerics(seed, cudnn_benchmark, precision, compile):
    """Seed this rank's generators and choose the numerics; True when our fast paths are on."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    np.random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if precision not in _PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose one of {", ".join(_PRECISIONS)}')
    torch.backends.cudnn.allow_tf32 = (precision == 'tf32')
    torch.backends.cuda.matmul.allow_tf32 = (precision == 'tf32')
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return precision == 'bf16' or compile # set_fast_paths, fused Adam, foreach EMA

def _split_batch(batch_size, batch_gpu, world_size):
    """(images per accumulation round, rounds) of each process."""
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // max(batch_gpu, 1)
    if batch_gpu < 1 or batch_size != batch_gpu * num_accumulation_rounds * world_size:
        raise ValueError(f'batch size {batch_size} is not divisible by {world_size} GPUs x {batch_gpu} images per GPU (--batch-gpu)')
    return batch_gpu, num_accumulation_rounds

def _open_data(dataset_kwargs, data_loader_kwargs, state, sampler_seed, cur_nimg, batch_gpu, device):
    """The dataset, its sampler (continuing the state's data order) and the data loader's iterator."""
    dist.print0('Loading dataset...')
    data = dnnlib.EasyDict()
    data.dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs) # subclass of training.dataset.Dataset
    data.sampler_idx = int(state['sampler_idx']) if state is not None and 'sampler_idx' in state else cur_nimg
    data.sampler_state = state.get('sampler_state') if state is not None else None # the data order's walk at sampler_idx
    if data.sampler_state is not None and len(data.sampler_state['order']) != len(data.dataset):
        dist.print0(f'Note: the state\'s data order is for {len(data.sampler_state["order"])} images, the dataset has {len(data.dataset)}; '
                    f'the data order starts afresh.')
        data.sampler_idx, data.sampler_state = 0, None
    data.sampler_seed = sampler_seed
    data.sampler = misc.InfiniteSampler(dataset=data.dataset, rank=dist.get_rank(), num_replicas=dist.get_world_size(), seed=sampler_seed,
                                        start_idx=data.sampler_idx, start_state=data.sampler_state)
    loader_kwargs = {k: v for k, v in data_loader_kwargs.items() if k != 'class_name'}
    if loader_kwargs.get('num_workers', 0) == 0:
        loader_kwargs.pop('prefetch_factor', None) # only valid with worker processes
    else:
        loader_kwargs.setdefault('worker_init_fn', _worker_init)
        loader_kwargs.setdefault('multiprocessing_context', 'spawn') # workers start clean: no inherited file handles or threads
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False # pinning needs an accelerator
    loader = torch.utils.data.DataLoader(dataset=data.dataset, sampler=data.sampler, batch_size=batch_gpu, **loader_kwargs)
    if data.sampler_idx > 0 and data.sampler_state is None:
        dist.print0(f'Fast-forwarding the data order to image {data.sampler_idx}...')
    data.iterator = iter(loader) # draws the workers' seed from torch's generator: before the network, as always
    atexit.register(_close_data_loader, data.iterator) # an error before the loop: stopped at exit, before multiprocessing joins them
    return data

def _batch_source(iterator, device, encoder=None):
    """next_batch() of TrainingStep: the loader's next images, scaled to [-1, 1] (or made the network's data by the
    EDM2 run's `encoder`: scaled pixels, or a draw of VAE latents), and labels on the device."""
    def next_batch():
        images, labels = _next_batch(iterator)
        images = images.to(device, non_blocking=True)
        images = encoder.encode_latents(images) if encoder is not None else images.to(torch.float32) / 127.5 - 1
        return images, labels.to(device, non_blocking=True)
    return next_batch

def _data_channels(dataset_obj, encoder):
    """Channels of the network's data: the dataset's, or those of its images made the data by an EDM2 run's encoder
    (4 for 8-channel VAE latents: a mean and a std per channel), found on a zero image without touching the random state."""
    if encoder is None:
        return dataset_obj.num_channels
    with torch.random.fork_rng(devices=[]):
        return encoder.encode_latents(torch.zeros([1, *dataset_obj.image_shape])).shape[1]

def _build_network(network_kwargs, dataset_obj, device, fast, compile, batch_gpu, num_accumulation_rounds, encoder=None):
    """The network to train, in train mode on the device; rank 0 prints its summary."""
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=_data_channels(dataset_obj, encoder),
                            label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs) # subclass of torch.nn.Module
    net.train().requires_grad_(True).to(device)
    if fast:
        set_fast_paths(net)
    if compile: # channels-last only pays under torch.compile: eager group_norm on CUDA converts such inputs back to NCHW
        net = net.to(memory_format=torch.channels_last)
    if dist.get_rank() == 0:
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        try:
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)
        except _OOM_ERRORS:
            raise MemoryError(_oom_message(batch_gpu, num_accumulation_rounds)) from None
    return net

#----------------------------------------------------------------------------
# Maintenance, once per tick: status line, snapshot, sample grid, state dump, logs.

def _report_tick(progress, mean_loss, lr, device, kimg_digits):
    """Print the status line, reporting the same values to training_stats (GPU memory on CUDA only)."""
    p = progress
    fields = []
    fields += [f"tick {training_stats.report0('Progress/tick', p.cur_tick):<5d}"]
    fields += [f"kimg {training_stats.report0('Progress/kimg', p.cur_nimg / 1e3):<9.{kimg_digits}f}"]
    fields += [f"loss {mean_loss:<8.4f}"]
    fields += [f"lr {training_stats.report0('Progress/lr', lr):<9.3g}"]
    fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', p.total_sec())):<12s}"]
    fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', p.tick_sec()):<7.1f}"]
    fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', p.tick_sec() / max(p.cur_nimg - p.tick_start_nimg, 1) * 1e3):<7.2f}"]
    fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', p.maintenance_sec):<6.1f}"]
    fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
    if device.type == 'cuda':
        fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
        fields += [f"reserved {training_stats.report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30):<6.2f}"]
        torch.cuda.reset_peak_memory_stats(device)
    dist.print0(' '.join(fields), flush=True)

def _report_loss_scale(loss_scale, warned):
    """Report the float16 loss scale; warn once (returns True) when it has stalled."""
    scale = training_stats.report0('Loss/scale', float(loss_scale.scale))
    if not warned and loss_scale.stalled(scale):
        dist.print0(f'Warning: the float16 loss scale has fallen to {scale:g} from --ls={loss_scale.target:g}; '
                    'the gradients are not finite at any scale and every step is skipped', flush=True)
        return True
    return warned

SAMPLE_STEPS = 16 # sampler steps of the grid written with each snapshot (NFE 31)

def sample_grid_images(net, num_images, device, num_steps=SAMPLE_STEPS, encoder=None):
    """uint8 [N, H, W, C] images of seeds 0..N-1 with the EDM sampler, as generate.py draws them (latents,
    then labels, one generator per seed)."""
    if is_edm2_network(net): # the EDM2 release's sampler, the same draws, and decoding (training/generation_edm2.py)
        images = edm2_images(net, encoder or default_encoder(None), list(range(num_images)), device, num_steps=num_steps)
        return images.permute(0, 2, 3, 1).cpu().numpy()
    rnd = StackedRandomGenerator(device, list(range(num_images)))
    latents, class_labels = latents_and_labels(net, rnd, device)
    with torch.no_grad():
        images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps)
    return images_to_uint8(images)

def _save_snapshot(run_dir, label, step, dataset_kwargs, device, safetensors=False):
    """network-snapshot-*.pkl (the EMA network, loss and augmentation) and samples-*.png (a grid of the EMA
    network's images of fixed seeds, one white pixel apart: 8x8 on CUDA, 4x4 elsewhere) by rank 0."""
    data = _snapshot_data(step.ema, step.loss_fn, step.augment_pipe, dataset_kwargs, check_consistency=(dist.get_world_size() > 1),
                          encoder=step.encoder)
    if dist.get_rank() != 0:
        return
    training_state.write_file(training_state.snapshot_path(run_dir, label), pickle.dump, data)
    if safetensors: # the same EMA weights in a format that carries no code: network-snapshot-*.safetensors
        safetensors_io.save_network(data['ema'], training_state.snapshot_path(run_dir, label)[:-len('.pkl')] + '.safetensors')
    grid_size = (8, 8) if device.type == 'cuda' else (4, 4)
    try:
        images = sample_grid_images(step.ema, grid_size[0] * grid_size[1], device, encoder=step.encoder)
    except (ImportError, OSError) as err: # a latent run where the VAE that decodes the grid (diffusers, its weights) is missing
        print(f'No sample grid with this snapshot: {err}')
        return
    save_image_grid(images, training_state.samples_path(run_dir, label), grid_size=grid_size, gap=1)

def _open_tensorboard(run_dir):
    """A SummaryWriter into the run folder (rank 0), or a clear error without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError('--tensorboard needs the tensorboard package (pip install tensorboard)') from None
    return SummaryWriter(run_dir)

def _update_logs(stats_path, tensorboard, cur_nimg, total_kimg):
    """Collect the tick's statistics (every rank) into stats.jsonl and TensorBoard (rank 0)."""
    training_stats.default_collector.update()
    stats = training_stats.default_collector.as_dict()
    timestamp = time.time()
    if stats_path is not None:
        training_state.append_line(stats_path, json.dumps(dict(stats, timestamp=timestamp)))
    if tensorboard is not None:
        for name, value in stats.items():
            tensorboard.add_scalar(name, value.mean, global_step=cur_nimg, walltime=timestamp)
        tensorboard.flush()
    dist.update_progress(cur_nimg // 1000, total_kimg)

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory (None on ranks other than 0).
    dataset_kwargs      = None,     # Options of the training set.
    data_loader_kwargs  = None,     # Options of torch.utils.data.DataLoader.
    network_kwargs      = None,     # Options of the network (preconditioner).
    loss_kwargs         = None,     # Options of the loss function.
    optimizer_kwargs    = None,     # Options of the optimizer.
    augment_kwargs      = None,     # Options of the augmentation pipeline, None = disable.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size for one training iteration.
    batch_gpu           = None,     # Limit batch size per GPU, None = no limit.
    total_kimg          = 200000,   # Training duration, measured in thousands of training images.
    ema_halflife_kimg   = 500,      # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg      = 10000,    # Learning rate ramp-up duration.
    loss_scaling        = 1,        # Loss scaling factor for reducing FP16 under/overflows.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots, None = disable.
    state_dump_ticks    = 500,      # How often to dump training state, None = disable.
    resume_pkl          = None,     # Start from the given network snapshot, None = random initialization.
    resume_state_dump   = None,     # Start from the given training state, None = reset training state.
    resume_kimg         = 0,        # Start from the given training progress.
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
    device              = None,     # Device to train on; None = CUDA when available, else the CPU.
    precision           = 'fp32',   # fp32 (faithful), tf32 (TF32 matmul/conv on CUDA), bf16 (autocast, float32 master weights).
    compile             = False,    # torch.compile the network for the training step?
    phema_kwargs        = None,     # Options of the power-function EMAs (training.phema.PowerFunctionEMA), None = disable.
    lr_kwargs           = None,     # Learning rate schedule (EDM2: training.loss_edm2.learning_rate_schedule), None = lr_rampup_kimg.
    encoder_kwargs      = None,     # Encoder saved with EDM2 snapshots (training.encoders.StandardRGBEncoder), None = none.
    tensorboard         = False,    # Also write the statistics as TensorBoard events (rank 0)?
    allow_code          = False,    # Load resume files that name code other than ours (runs the code they carry)?
    safetensors         = False,    # Also write each snapshot's EMA as .safetensors (training/safetensors_io.py)?
):
    """Train; returns dnnlib.EasyDict(cur_nimg, stopped): stopped is True after a stop request (SIGTERM/SIGINT)."""
    dataset_kwargs, data_loader_kwargs = dict(dataset_kwargs or {}), dict(data_loader_kwargs or {})
    network_kwargs, loss_kwargs, optimizer_kwargs = dict(network_kwargs or {}), dict(loss_kwargs or {}), dict(optimizer_kwargs or {})
    device = misc.choose_device(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    # Initialize.
    start_time = time.time()
    fast = _set_up_numerics(seed, cudnn_benchmark, precision, compile)
    batch_gpu, num_accumulation_rounds = _split_batch(batch_size, batch_gpu, world_size)
    state, cur_nimg, sampler_seed = training_state.read_resume_state(resume_state_dump, resume_kimg, seed, batch_size, allow_code)
    if state is not None and cur_nimg >= total_kimg * 1000:
        if rank == 0:
            _finish_complete_run(run_dir, state, resume_state_dump, cur_nimg, total_kimg,
                                 dict(loss_kwargs=loss_kwargs, augment_kwargs=augment_kwargs, dataset_kwargs=dataset_kwargs, encoder_kwargs=encoder_kwargs))
        return dnnlib.EasyDict(cur_nimg=cur_nimg, stopped=False)
    data = _open_data(dataset_kwargs, data_loader_kwargs, state, sampler_seed, cur_nimg, batch_gpu, device)
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs) if encoder_kwargs else None # an EDM2 run's, kept with its snapshots
    net = _build_network(network_kwargs, data.dataset, device, fast, compile, batch_gpu, num_accumulation_rounds, encoder)

    # Setup optimizer, EMA and the training step.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs) # training.loss.(VP|VE|EDM)Loss
    fused = fused_adam_kwargs(optimizer_kwargs, device) if fast else {}
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs, **fused) # subclass of torch.optim.Optimizer
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None # training.augment.AugmentPipe
    ddp = _wrap_ddp(net, device) if world_size > 1 else net
    edm2 = lr_kwargs is not None # an EDM2 run: float16 as the release trains it, the loss unscaled and non-finite gradients zeroed
    step = TrainingStep(net=net, ema=copy.deepcopy(net).eval().requires_grad_(False), loss_fn=loss_fn, optimizer=optimizer,
                        batch_size=batch_size, lr=optimizer_kwargs['lr'], num_accumulation_rounds=num_accumulation_rounds,
                        augment_pipe=augment_pipe, ddp=ddp, train_net=(torch.compile(ddp) if compile else ddp),
                        loss_scale=(DynamicLossScale(loss_scaling, device=device) if getattr(net, 'use_fp16', False) and not edm2 else None),
                        loss_scaling=loss_scaling, lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                        ema_rampup_ratio=ema_rampup_ratio, precision=precision, fast=fast, lr_kwargs=lr_kwargs,
                        encoder=encoder,
                        nonfinite_grad=(0 if edm2 else 1e5))

    # Resume training: weights, progress, random streams; power-function EMAs (training/phema.py).
    training_state.resume_weights(step, state, resume_state_dump, resume_pkl=resume_pkl, allow_code=allow_code)
    progress = training_state.resume_progress(state, cur_nimg, device)
    if phema_kwargs:
        step.phema = PowerFunctionEMA(net, **phema_kwargs, run_dir=run_dir, resume_state=state, snapshot_data=dict(
            loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs),
            **({'encoder': step.encoder} if step.encoder is not None else {})))
    del state

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    progress.begin(start_time)
    dist.update_progress(progress.cur_nimg // 1000, total_kimg)
    stats_path = os.path.join(run_dir, 'stats.jsonl') if rank == 0 and run_dir is not None else None
    if stats_path is not None:
        training_state.trim_partial_line(stats_path)
    writer = _open_tensorboard(run_dir) if tensorboard and rank == 0 and run_dir is not None else None
    stop = StopRequest()
    stop.install()
    warned_stalled = False # the loss-scale warning is printed once
    fractional = not float(kimg_per_tick).is_integer() # fractional ticks (--tick=0.25) show and name the exact kimg
    next_batch = _batch_source(data.iterator, device, step.encoder)
    p = progress
    try:
        while True:
            step(next_batch, p.cur_nimg)
            p.cur_nimg += batch_size
            done = (p.cur_nimg >= total_kimg * 1000)
            interrupted = (not done) and agree_to_stop(stop.requested or dist.should_stop())
            if interrupted:
                dist.print0(f'\nStop requested (SIGTERM/SIGINT): saving a snapshot and the training state at {p.cur_nimg} images...', flush=True)
            tick_done = done or (p.cur_tick == 0) or (p.cur_nimg >= p.tick_start_nimg + kimg_per_tick * 1000)
            if not (tick_done or interrupted):
                continue

            # Maintenance: status line, snapshot and samples, state dump (an interruption counts as part of the tick), logs.
            p.end_tick()
            _report_tick(p, step.take_mean_loss(), optimizer.param_groups[0]['lr'], device, kimg_digits=(3 if fractional else 1))
            if step.loss_scale is not None:
                warned_stalled = _report_loss_scale(step.loss_scale, warned_stalled)
            label = training_state.kimg_label(p.cur_nimg, fractional_ticks=fractional, stopped=interrupted)
            if interrupted or ((snapshot_ticks is not None) and (done or p.cur_tick % snapshot_ticks == 0)):
                _save_snapshot(run_dir, label, step, dataset_kwargs, device, safetensors)
                if step.phema is not None:
                    step.phema.snapshot(p.cur_nimg, done, label)
            if interrupted or ((state_dump_ticks is not None) and (done or p.cur_tick % state_dump_ticks == 0) and p.cur_tick != 0):
                path = training_state.state_path(run_dir, label) if run_dir is not None else None
                training_state.save_state(path, step, data, p, tick_done) # a stop within a tick continues it
            _update_logs(stats_path, writer, p.cur_nimg, total_kimg)

            # Next tick.
            if interrupted:
                dist.print0()
                dist.print0(f'Stopped at {p.cur_nimg} images, with a snapshot and the training state in {run_dir}.')
                break
            p.next_tick()
            if done:
                break
    finally:
        stop.uninstall()
        _close_data_loader(data.iterator)
        atexit.unregister(_close_data_loader)
        if writer is not None:
            writer.close()

    # Done.
    dist.print0()
    dist.print0('Exiting...')
    return dnnlib.EasyDict(cur_nimg=p.cur_nimg, stopped=interrupted)

#----------------------------------------------------------------------------
