"""The training state: what a run saves so that another process continues it exactly (network, EMA, optimizer,
loss scale, power-function EMAs, progress, data order and random generators of every rank), how it is written
(whole, under a temporary name) and read back, how a run resumes from it, and the names of a run's files."""

import contextlib
import os
import random
import re
import time

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import network_io, resume_checks

#----------------------------------------------------------------------------
# Names of a run's files: the kimg as the reference writes it (NNNNNN); with fractional ticks (--tick=0.25)
# NNNNNN.NNN, the exact image count, so that every snapshot, grid and state keeps its own name.

STATE_NAME_RE = re.compile(r'training-state-(\d{6,}(?:\.\d{3})?)\.pt')

def kimg_label(cur_nimg, fractional_ticks=False, stopped=False):
    """NNNNNN; NNNNNN.NNN with fractional ticks, and for a stop within a kimg (not to take the name of a tick's files)."""
    if fractional_ticks or (stopped and cur_nimg % 1000 != 0):
        return f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'
    return f'{cur_nimg // 1000:06d}'

def label_kimg(label):
    """The kimg of a label: an int for NNNNNN, a float for NNNNNN.NNN."""
    return int(label) if '.' not in label else int(label.replace('.', '')) / 1000

def snapshot_path(run_dir, label):
    return os.path.join(run_dir, f'network-snapshot-{label}.pkl')

def state_path(run_dir, label):
    return os.path.join(run_dir, f'training-state-{label}.pt')

def samples_path(run_dir, label):
    return os.path.join(run_dir, f'samples-{label}.png')

def latest_state(run_dir):
    """(path, label) of the newest training-state-*.pt in run_dir, or (None, None)."""
    labels = [m.group(1) for name in os.listdir(run_dir) for m in [STATE_NAME_RE.fullmatch(name)] if m]
    if not labels:
        return None, None
    label = max(labels, key=label_kimg)
    return state_path(run_dir, label), label

#----------------------------------------------------------------------------
# Writing: whole files, and text files appended line by line.

def write_file(path, dump, data):
    """dump(data, file) into `path`, which appears only once complete."""
    with dnnlib.util.atomic_write(path, 'wb') as f:
        dump(data, f)

def trim_partial_line(path):
    """Cut a text file back to its last complete line: an append cut short by a crash leaves a partial one."""
    if os.path.isfile(path):
        with naming(path), open(path, 'rb+') as f:
            data = f.read()
            f.truncate(data.rfind(b'\n') + 1)

def append_line(path, line):
    """Append one line to a text file and make it durable: one tick's statistics cost the same at any length of run."""
    with naming(path), open(path, 'at') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())

@contextlib.contextmanager
def naming(path):
    """An OSError of the block (such as a full disk) names `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, path) from None

#----------------------------------------------------------------------------
# Random generator states, per rank, for exact resumption.

def get_rng_state(device):
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state

def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)

def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    if dist.get_world_size() == 1:
        return [obj]
    objs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    torch.distributed.gather_object(obj, objs, dst=0)
    return objs

#----------------------------------------------------------------------------
# Where a run stands: images, ticks and training time, continued across resumes.

class Progress:
    def __init__(self, cur_nimg=0, cur_tick=0, tick_start_nimg=None, total_sec=0.0):
        self.cur_nimg = cur_nimg                # Images trained on.
        self.cur_tick = cur_tick                # Tick in progress.
        self.tick_start_nimg = cur_nimg if tick_start_nimg is None else tick_start_nimg
        self.start_nimg = cur_nimg              # Where this process started.
        self.earlier_sec = total_sec            # Training time of the run's earlier processes.
        self.start_time = self.tick_start_time = self.tick_end_time = time.time()
        self.maintenance_sec = 0.0              # Time between the ticks (first tick: the setup).

    def begin(self, start_time):
        """The loop starts; the setup since start_time counts as the first tick's maintenance."""
        self.start_time, self.tick_start_time = start_time, time.time()
        self.maintenance_sec = self.tick_start_time - start_time

    def end_tick(self):
        self.tick_end_time = time.time()

    def next_tick(self):
        self.cur_tick += 1
        self.tick_start_nimg = self.cur_nimg
        self.tick_start_time = time.time()
        self.maintenance_sec = self.tick_start_time - self.tick_end_time

    def total_sec(self):
        return self.earlier_sec + (self.tick_end_time - self.start_time)

    def tick_sec(self):
        return self.tick_end_time - self.tick_start_time

#----------------------------------------------------------------------------
# Saving: what the reference writes (net, optimizer_state) plus what an exact continuation needs.

def save_state(path, step, data, progress, tick_done):
    """training-state-*.pt by rank 0 (every rank gives its random generator states). `step` is the
    training_loop.TrainingStep, `data` its data (sampler and order), `progress` where the run stands; a stop
    within a tick (not tick_done) continues that tick when resumed."""
    rng_states = gather_to_rank0(get_rng_state(step.loss_sum.device))
    if dist.get_rank() != 0:
        return
    # The data order's walk at the next image, replayed from the previous dump, so resuming needs no replay.
    cur_nimg = progress.cur_nimg
    next_idx = data.sampler_idx + (cur_nimg - progress.start_nimg)
    data.sampler_state = data.sampler.state_at(next_idx, data.sampler_state)
    cur_tick, tick_start_nimg = (progress.cur_tick + 1, cur_nimg) if tick_done else (progress.cur_tick, progress.tick_start_nimg)
    write_file(path, torch.save, dict(
        net=step.net, optimizer_state=step.optimizer.state_dict(), ema=step.ema,
        cur_nimg=cur_nimg, cur_tick=cur_tick, tick_start_nimg=tick_start_nimg, total_sec=progress.total_sec(),
        sampler_seed=data.sampler_seed, sampler_idx=next_idx, sampler_state=data.sampler_state,
        batch_size=step.batch_size, world_size=dist.get_world_size(), rng_states=rng_states,
        loss_scale=(step.loss_scale.state_dict() if step.loss_scale is not None else None),
        **(dict(phema=step.phema.state_dict()) if step.phema is not None else {}),
    ))

#----------------------------------------------------------------------------
# Reading and resuming.

def load_state_dump(path, allow_code=False):
    """Load a training-state-NNNNNN.pt written by us or by the reference release.

    These files hold whole pickled modules: they are read with the safe loader of
    torch_utils/safe_pickle.py (our classes, tensors, arrays; never torch.load), or
    in full with allow_code=True. Counters and generator states are checked
    (training/resume_checks.py). Any failure is a one-line ValueError naming the file.
    """
    try:
        with dnnlib.util.open_regular(path) as f:
            data = persistence.torch_load(f, allow_code=allow_code, name=path)
    except FileNotFoundError:
        raise FileNotFoundError(f'training state not found: {path}') from None
    except Exception as err: # pylint: disable=broad-exception-caught
        if isinstance(err, ValueError) and path in str(err) and '\n' not in str(err):
            raise ValueError(str(err)) from None
        raise ValueError(persistence.load_error_message(path, 'training state', err)) from None
    if not isinstance(data, dict) or 'net' not in data or 'optimizer_state' not in data:
        raise ValueError(f'{path} is not a training state: it lacks the "net" and "optimizer_state" entries')
    return resume_checks.check_state(data, path)

def read_resume_state(path, resume_kimg, seed, batch_size, allow_code=False):
    """(state or None, cur_nimg, the data order's seed), read before anything else: the state decides the data order."""
    if path is None:
        return None, round(resume_kimg * 1000), seed
    dist.print0(f'Loading training state from "{path}"...')
    state = load_state_dump(path, allow_code=allow_code)
    if 'cur_nimg' not in state: # the reference's layout: progress from the file name
        return state, round(resume_kimg * 1000), seed
    world_size = dist.get_world_size()
    if state.get('batch_size', batch_size) != batch_size or state.get('world_size', world_size) != world_size:
        dist.print0(f'Note: the state was saved with batch {state.get("batch_size")} in {state.get("world_size")} processes; '
                    f'resuming with batch {batch_size} in {world_size} processes does not repeat the original run exactly.')
    return state, int(state['cur_nimg']), int(state.get('sampler_seed', seed))

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

def resume_weights(step, state, path, resume_pkl=None, allow_code=False):
    """Network, EMA, optimizer and loss scale of `step` from the network snapshot resume_pkl and the state read from `path`."""
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        source = dist.rank0_first(lambda: network_io.load_network_pkl(resume_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        _copy_by_name(source, step.net, resume_pkl)
        _copy_by_name(source, step.ema, resume_pkl)
        del source
    if state is None:
        return
    if state.get('ema') is None and resume_pkl is None:
        raise ValueError(f'{path} holds no EMA, and there is no network snapshot to take it from: '
                         f'put the run\'s network-snapshot-NNNNNN.pkl of the same kimg beside it')
    try:
        misc.copy_params_and_buffers(src_module=state['net'], dst_module=step.net, require_all=True)
        if state.get('ema') is not None:
            misc.copy_params_and_buffers(src_module=state['ema'], dst_module=step.ema, require_all=True)
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from None
    step.optimizer.load_state_dict(state['optimizer_state'])
    if step.loss_scale is not None and state.get('loss_scale') is not None:
        step.loss_scale.load_state_dict(state['loss_scale'])

def resume_progress(state, cur_nimg, device):
    """Progress of an interrupted run, whose random streams continue (a new run, or the reference's layout: at cur_nimg)."""
    if state is None or 'cur_nimg' not in state:
        return Progress(cur_nimg)
    rng_states = state.get('rng_states')
    if rng_states is not None and len(rng_states) == dist.get_world_size():
        set_rng_state(rng_states[dist.get_rank()], device)
    else:
        dist.print0('Note: the state holds no random generator state for this number of processes; new random streams are used.')
    return Progress(cur_nimg, cur_tick=int(state.get('cur_tick', 0)), tick_start_nimg=int(state.get('tick_start_nimg', cur_nimg)),
                    total_sec=float(state.get('total_sec', 0.0)))

#----------------------------------------------------------------------------
