"""Main training loop: data, network, optimiser, EMA, ticks, snapshots,
state dumps and exact resumption."""

import atexit
import contextlib
import copy
import inspect
import json
import os
import pickle
import random
import signal
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training import network_io
from training.loss_scale import DynamicLossScale
from training.networks import set_fast_paths
from training.phema import PowerFunctionEMA

#----------------------------------------------------------------------------
# Out-of-memory errors of every supported torch version.

_OOM_ERRORS = tuple({getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})

def _oom_message(batch_gpu, num_accumulation_rounds):
    return (f'out of GPU memory with a per-GPU batch of {batch_gpu} images ({num_accumulation_rounds} accumulation rounds): '
            f'lower --batch-gpu (the batch is then split into more accumulation rounds)')

#----------------------------------------------------------------------------
# Stop requests (SIGTERM from a scheduler, Ctrl-C): finish the current step,
# write a snapshot and a state dump, then return.

class _StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = dict()

    def install(self):
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError: # not the main thread: signals stay with the caller
            self._previous.clear()

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame):
        # No printing here: the signal may arrive in the middle of a print.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt # second Ctrl-C: abort now
        self.requested = True

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

_stop_group = None # gloo process group for the stop flag, so that checking it never waits for the GPU

def _agree_to_stop(local_request):
    """True on every rank when any rank was asked to stop (a collective call under DDP)."""
    global _stop_group
    if dist.get_world_size() == 1:
        return bool(local_request)
    if _stop_group is None:
        is_gloo = torch.distributed.get_backend() == 'gloo'
        _stop_group = torch.distributed.group.WORLD if is_gloo else torch.distributed.new_group(backend='gloo')
    flag = torch.tensor([1.0 if local_request else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=_stop_group)
    return bool(flag.item() > 0)

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
# Random number generator states, per rank, for exact resumption.

def _get_rng_state(device):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state

def _set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)

def _gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    if dist.get_world_size() == 1:
        return [obj]
    objs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    torch.distributed.gather_object(obj, objs, dst=0)
    return objs

#----------------------------------------------------------------------------
# Files.

def load_state_dump(path, allow_code=False):
    """Load a training-state-NNNNNN.pt written by us or by the reference release.

    These files hold whole pickled modules: they are unpickled with the safe
    loader of torch_utils.persistence (our classes, tensors, arrays), or in
    full with allow_code=True.
    """
    try:
        with open(path, 'rb') as f:
            data = persistence.torch_load(f, allow_code=allow_code)
    except persistence.CodeNotAllowedError as err:
        raise ValueError(persistence.refused_message(path, err)) from None
    except FileNotFoundError:
        raise FileNotFoundError(f'training state not found: {path}') from None
    except (RuntimeError, *dnnlib.util.UNPICKLING_ERRORS) as err:
        raise ValueError(f'{path} is not a readable training state ({type(err).__name__}: {err})') from None
    if not isinstance(data, dict) or 'net' not in data or 'optimizer_state' not in data:
        raise ValueError(f'{path} is not a training state: it lacks the "net" and "optimizer_state" entries')
    return data

def _copy_by_name(src_module, dst_module, source_name):
    """Copy parameters and buffers by name (not all required); say which names the source lacks."""
    src_names = {name for name, _ in misc.named_params_and_buffers(src_module)}
    dst_names = [name for name, _ in misc.named_params_and_buffers(dst_module)]
    missing = [name for name in dst_names if name not in src_names]
    if len(missing) == len(dst_names):
        raise ValueError(f'{source_name}: the network shares no parameter names with the one being trained '
                         f'(e.g. {", ".join(dst_names[:3])})')
    if missing:
        dist.print0(f'{source_name} lacks {len(missing)} of {len(dst_names)} parameters/buffers, kept as initialised: '
                    + ', '.join(missing[:10]) + (' ...' if len(missing) > 10 else ''))
    try:
        misc.copy_params_and_buffers(src_module=src_module, dst_module=dst_module, require_all=False)
    except ValueError as err:
        raise ValueError(f'{source_name}: {err}') from None

def _snapshot_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'network-snapshot-{cur_nimg//1000:06d}.pkl')

def _snapshot_data(ema, loss_fn, augment_pipe, dataset_kwargs, check_consistency=False):
    """What a network snapshot holds: the faithful EMA network, loss and augmentation (copies, eval, on the CPU)."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
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

def _finish_complete_run(run_dir, state, resume_state_dump, cur_nimg, total_kimg, loss_kwargs, augment_kwargs, dataset_kwargs):
    """Resuming a state that already reaches total_kimg trains nothing; a run stopped between its last state dump and
    its last snapshot gets that snapshot, from the state's EMA (the network it would have held)."""
    snapshot_path = _snapshot_path(run_dir, cur_nimg) if run_dir is not None else None
    if snapshot_path is not None and not os.path.isfile(snapshot_path) and state.get('ema') is not None:
        loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
        augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
        _write_file(snapshot_path, pickle.dump, _snapshot_data(state['ema'], loss_fn, augment_pipe, dataset_kwargs))
        dist.print0(f'Wrote the missing final snapshot {snapshot_path}')
    dist.print0(f'Training is already complete: {resume_state_dump} is at {cur_nimg / 1000:g} kimg of {total_kimg} kimg (--duration); nothing to train.')

def _write_file(path, dump, data):
    """dump(data, file) into `path`, which appears only once complete."""
    with dnnlib.util.atomic_write(path, 'wb') as f:
        dump(data, f)

def _trim_partial_line(path):
    """Cut a text file back to its last complete line: an append cut short by a crash leaves a partial one."""
    if os.path.isfile(path):
        with _naming(path), open(path, 'rb+') as f:
            data = f.read()
            f.truncate(data.rfind(b'\n') + 1)

def _append_line(path, line):
    """Append one line to a text file and make it durable: one tick's statistics cost the same at any length of run."""
    with _naming(path), open(path, 'at') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())

@contextlib.contextmanager
def _naming(path):
    """An OSError of the block (such as a full disk) names `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, path) from None

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
    allow_code          = False,    # Load resume files that name code other than ours (runs the code they carry)?
):
    dataset_kwargs = dict(dataset_kwargs or {})
    data_loader_kwargs = dict(data_loader_kwargs or {})
    network_kwargs = dict(network_kwargs or {})
    loss_kwargs = dict(loss_kwargs or {})
    optimizer_kwargs = dict(optimizer_kwargs or {})
    device = misc.choose_device(device)
    rank = dist.get_rank()
    world_size = dist.get_world_size()

    # Initialize.
    start_time = time.time()
    np.random.seed((seed * world_size + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if precision not in _PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose one of {", ".join(_PRECISIONS)}')
    fast = (precision == 'bf16' or compile) # our fast paths: set_fast_paths, fused Adam, foreach EMA
    torch.backends.cudnn.allow_tf32 = (precision == 'tf32')
    torch.backends.cuda.matmul.allow_tf32 = (precision == 'tf32')
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Select batch size per GPU.
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    num_accumulation_rounds = batch_gpu_total // max(batch_gpu, 1)
    if batch_gpu < 1 or batch_size != batch_gpu * num_accumulation_rounds * world_size:
        raise ValueError(f'batch size {batch_size} is not divisible by {world_size} GPUs x {batch_gpu} images per GPU (--batch-gpu)')

    # Resume state (read early: it decides the data order).
    state = None
    if resume_state_dump is not None:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        state = load_state_dump(resume_state_dump, allow_code=allow_code)
    cur_nimg = resume_kimg * 1000
    sampler_seed = seed
    if state is not None and 'cur_nimg' in state:
        cur_nimg = int(state['cur_nimg'])
        sampler_seed = int(state.get('sampler_seed', seed))
        if state.get('batch_size', batch_size) != batch_size or state.get('world_size', world_size) != world_size:
            dist.print0(f'Note: the state was saved with batch {state.get("batch_size")} on {state.get("world_size")} GPUs; '
                        f'resuming with batch {batch_size} on {world_size} GPUs does not repeat the original run exactly.')
    if state is not None and cur_nimg >= total_kimg * 1000:
        if rank == 0:
            _finish_complete_run(run_dir, state, resume_state_dump, cur_nimg, total_kimg, loss_kwargs, augment_kwargs, dataset_kwargs)
        return
    sampler_idx = int(state['sampler_idx']) if state is not None and 'sampler_idx' in state else cur_nimg
    sampler_state = state.get('sampler_state') if state is not None else None # the data order's walk at sampler_idx

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs) # subclass of training.dataset.Dataset
    if sampler_state is not None and len(sampler_state['order']) != len(dataset_obj):
        dist.print0(f'Note: the state\'s data order is for {len(sampler_state["order"])} images, the dataset has {len(dataset_obj)}; '
                    f'the data order starts afresh.')
        sampler_idx, sampler_state = 0, None
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=sampler_seed, start_idx=sampler_idx, start_state=sampler_state)
    loader_kwargs = {k: v for k, v in data_loader_kwargs.items() if k != 'class_name'}
    if loader_kwargs.get('num_workers', 0) == 0:
        loader_kwargs.pop('prefetch_factor', None) # only valid with worker processes
    else:
        loader_kwargs.setdefault('worker_init_fn', _worker_init)
        loader_kwargs.setdefault('multiprocessing_context', 'spawn') # workers start clean: no inherited file handles or threads
    if device.type != 'cuda':
        loader_kwargs['pin_memory'] = False # pinning needs an accelerator
    dataset_loader = torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **loader_kwargs)
    if sampler_idx > 0 and sampler_state is None:
        dist.print0(f'Fast-forwarding the data order to image {sampler_idx}...')
    dataset_iterator = iter(dataset_loader) # draws the workers' seed from torch's generator: before the network, as always
    atexit.register(_close_data_loader, dataset_iterator) # an error before the loop below: stopped at exit, before multiprocessing joins them

    # Construct network.
    dist.print0('Constructing network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs) # subclass of torch.nn.Module
    net.train().requires_grad_(True).to(device)
    if fast:
        set_fast_paths(net)
    if compile: # channels-last only pays under torch.compile: eager group_norm on CUDA converts such inputs back to NCHW
        net = net.to(memory_format=torch.channels_last)
    if rank == 0:
        images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution], device=device)
        sigma = torch.ones([batch_gpu], device=device)
        labels = torch.zeros([batch_gpu, net.label_dim], device=device)
        try:
            misc.print_module_summary(net, [images, sigma, labels], max_nesting=2)
        except _OOM_ERRORS:
            raise MemoryError(_oom_message(batch_gpu, num_accumulation_rounds)) from None
        del images, sigma, labels

    # Setup optimizer.
    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs) # training.loss.(VP|VE|EDM)Loss
    fused = fused_adam_kwargs(optimizer_kwargs, device) if fast else {}
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs, **fused) # subclass of torch.optim.Optimizer
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None # training.augment.AugmentPipe
    ddp = net
    if world_size > 1:
        ddp = _wrap_ddp(net, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_scale = DynamicLossScale(loss_scaling, device=device) if getattr(net, 'use_fp16', False) else None
    train_net = torch.compile(ddp) if compile else ddp
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=(precision == 'bf16'))

    # Resume training from previous snapshot.
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        source = dist.rank0_first(lambda: network_io.load_network_pkl(resume_pkl, verbose=(rank == 0), allow_code=allow_code))
        _copy_by_name(source, net, resume_pkl)
        _copy_by_name(source, ema, resume_pkl)
        del source
    if state is not None:
        if state.get('ema') is None and resume_pkl is None:
            raise ValueError(f'{resume_state_dump} holds no EMA, and there is no network snapshot to take it from: '
                             f'put the run\'s network-snapshot-NNNNNN.pkl of the same kimg beside it')
        try:
            misc.copy_params_and_buffers(src_module=state['net'], dst_module=net, require_all=True)
            if state.get('ema') is not None:
                misc.copy_params_and_buffers(src_module=state['ema'], dst_module=ema, require_all=True)
        except ValueError as err:
            raise ValueError(f'{resume_state_dump}: {err}') from None
        optimizer.load_state_dict(state['optimizer_state'])
        if loss_scale is not None and state.get('loss_scale') is not None:
            loss_scale.load_state_dict(state['loss_scale'])

    # Continue the counters and random streams of an interrupted run.
    cur_tick = 0
    tick_start_nimg = cur_nimg
    if state is not None and 'cur_nimg' in state:
        cur_tick = int(state.get('cur_tick', 0))
        tick_start_nimg = int(state.get('tick_start_nimg', cur_nimg))
        rng_states = state.get('rng_states')
        if rng_states is not None and len(rng_states) == world_size:
            _set_rng_state(rng_states[rank], device)
        else:
            dist.print0('Note: the state holds no random generator state for this number of GPUs; new random streams are used.')

    # Power-function EMAs for post-hoc EMA (training/phema.py).
    phema = PowerFunctionEMA(net, **phema_kwargs, run_dir=run_dir, resume_state=state, snapshot_data=dict(
        loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))) if phema_kwargs else None
    del state

    # Train.
    start_nimg = cur_nimg
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    dist.update_progress(cur_nimg // 1000, total_kimg)
    stats_path = os.path.join(run_dir, 'stats.jsonl') if rank == 0 and run_dir is not None else None
    if stats_path is not None:
        _trim_partial_line(stats_path)
    stop = _StopRequest()
    stop.install()
    warned_stalled = False # the loss-scale warning is printed once
    kimg_digits = 1 if float(kimg_per_tick).is_integer() else 3 # fractional ticks (--tick=0.25) show them
    tick_loss, tick_loss_num = torch.zeros([], dtype=torch.float64, device=device), 0 # this rank's loss sum of the tick
    try:
        while True:

            # Accumulate gradients.
            optimizer.zero_grad(set_to_none=True)
            try:
                for round_idx in range(num_accumulation_rounds):
                    with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                        images, labels = _next_batch(dataset_iterator)
                        images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
                        labels = labels.to(device, non_blocking=True)
                        with autocast():
                            loss = loss_fn(net=train_net, images=images, labels=labels, augment_pipe=augment_pipe)
                        training_stats.report('Loss/loss', loss)
                        tick_loss.add_(loss.detach().sum().to(tick_loss)) # on the device: read once per tick
                        tick_loss_num += loss.numel()
                        loss.sum().mul((loss_scale.scale if loss_scale else loss_scaling) / batch_gpu_total).backward()
            except _OOM_ERRORS:
                raise MemoryError(_oom_message(batch_gpu, num_accumulation_rounds)) from None

            # Update weights.
            for g in optimizer.param_groups:
                g['lr'] = optimizer_kwargs['lr'] * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
            if loss_scale is None:
                for param in net.parameters():
                    if param.grad is not None:
                        torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
                optimizer.step()
            else: # float16: a step whose gradients overflowed is skipped; the others are all finite
                training_stats.report('Loss/skipped_step', loss_scale.step(optimizer, net.parameters()))

            # Update EMA.
            ema_halflife_nimg = ema_halflife_kimg * 1000
            if ema_rampup_ratio is not None:
                ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
            ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
            with torch.no_grad():
                if fast: # one fused kernel per parameter group; equal up to float rounding
                    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)
                else:
                    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                        p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
            if phema is not None:
                phema.update(net, nimg=cur_nimg + batch_size, batch_size=batch_size)

            # Perform maintenance tasks once per tick.
            cur_nimg += batch_size
            done = (cur_nimg >= total_kimg * 1000)
            interrupted = (not done) and _agree_to_stop(stop.requested or dist.should_stop())
            if interrupted:
                dist.print0(f'\nStop requested (SIGTERM/SIGINT): saving a snapshot and the training state at {cur_nimg} images...', flush=True)
            tick_done = done or (cur_tick == 0) or (cur_nimg >= tick_start_nimg + kimg_per_tick * 1000)
            if not (tick_done or interrupted):
                continue

            # Print status line, accumulating the same information in training_stats.
            tick_end_time = time.time()
            fields = []
            fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
            fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.{kimg_digits}f}"]
            fields += [f"loss {float(tick_loss) / max(tick_loss_num, 1):<8.4f}"]
            fields += [f"lr {training_stats.report0('Progress/lr', optimizer.param_groups[0]['lr']):<9.3g}"]
            tick_loss.zero_()
            tick_loss_num = 0
            fields += [f"time {dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
            fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
            fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3):<7.2f}"]
            fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
            fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
            gpu_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0
            gpu_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == 'cuda' else 0
            fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', gpu_mem):<6.2f}"]
            fields += [f"reserved {training_stats.report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved):<6.2f}"]
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            dist.print0(' '.join(fields), flush=True)
            if loss_scale is not None:
                scale = training_stats.report0('Loss/scale', float(loss_scale.scale))
                if not warned_stalled and loss_scale.stalled(scale):
                    dist.print0(f'Warning: the float16 loss scale has fallen to {scale:g} from --ls={loss_scale.target:g}; '
                                'the gradients are not finite at any scale and every step is skipped', flush=True)
                    warned_stalled = True

            # Save network snapshot.
            if interrupted or ((snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0)):
                data = _snapshot_data(ema, loss_fn, augment_pipe, dataset_kwargs, check_consistency=(world_size > 1))
                if rank == 0:
                    _write_file(_snapshot_path(run_dir, cur_nimg), pickle.dump, data)
                del data # conserve memory
                if phema is not None:
                    phema.snapshot(cur_nimg, done)

            # Save full dump of the training state: what the reference writes (net, optimizer_state)
            # plus what an exact continuation needs. An interruption counts as part of the current tick.
            if interrupted or ((state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0):
                rng_states = _gather_to_rank0(_get_rng_state(device))
                if rank == 0:
                    # The data order's walk at the next image, replayed from the previous dump, so resuming needs no replay.
                    next_idx = sampler_idx + (cur_nimg - start_nimg) # next image of the data order
                    sampler_state = dataset_sampler.state_at(next_idx, sampler_state)
                    state_path = os.path.join(run_dir, f'training-state-{cur_nimg//1000:06d}.pt')
                    _write_file(state_path, torch.save, dict(
                        net=net, optimizer_state=optimizer.state_dict(), ema=ema,
                        cur_nimg=cur_nimg, cur_tick=(cur_tick + 1 if tick_done else cur_tick), # a stop within a tick continues it
                        tick_start_nimg=(cur_nimg if tick_done else tick_start_nimg),
                        sampler_seed=sampler_seed, sampler_idx=next_idx, sampler_state=sampler_state,
                        batch_size=batch_size, world_size=world_size, rng_states=rng_states,
                        loss_scale=(loss_scale.state_dict() if loss_scale is not None else None),
                        **(dict(phema=phema.state_dict()) if phema is not None else {}),
                    ))
                del rng_states

            # Update logs.
            training_stats.default_collector.update()
            if stats_path is not None:
                _append_line(stats_path, json.dumps(dict(training_stats.default_collector.as_dict(), timestamp=time.time())))
            dist.update_progress(cur_nimg // 1000, total_kimg)

            # Update state.
            if interrupted:
                dist.print0()
                dist.print0(f'Stopped at {cur_nimg} images; continue with --resume={os.path.join(run_dir or ".", f"training-state-{cur_nimg//1000:06d}.pt")}')
                break
            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            if done:
                break
    finally:
        stop.uninstall()
        _close_data_loader(dataset_iterator)
        atexit.unregister(_close_data_loader)

    # Done.
    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------
