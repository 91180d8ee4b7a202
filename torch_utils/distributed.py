"""Process-group setup for single- and multi-process runs (`torchrun`):
NCCL on CUDA, gloo on the CPU."""

import atexit
import datetime
import os
import sys
import time

import torch

from . import training_stats
from .misc import choose_device, set_cpu_threads

#----------------------------------------------------------------------------

def init(device=None):
    """Initialise this process and return its device.

    `device` is None (CUDA when available, else the CPU), 'cpu', 'cuda' or
    'cuda:N'. Under torchrun each rank on CUDA takes GPU LOCAL_RANK. A single
    process without torchrun needs no process group and starts none.
    """
    if 'MASTER_ADDR' not in os.environ:
        os.environ['MASTER_ADDR'] = 'localhost'
    if 'MASTER_PORT' not in os.environ:
        os.environ['MASTER_PORT'] = '29500'
    if 'RANK' not in os.environ:
        os.environ['RANK'] = '0'
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = '0'
    if 'WORLD_SIZE' not in os.environ:
        os.environ['WORLD_SIZE'] = '1'

    device = choose_device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']) % torch.cuda.device_count())
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if device.type == 'cpu':
        set_cpu_threads(int(os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])))

    world_size = int(os.environ['WORLD_SIZE'])
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if device.type == 'cuda' and sys.platform != 'win32' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://', timeout=datetime.timedelta(seconds=collective_timeout()))
        if backend == 'gloo':
            atexit.register(finish) # gloo's threads abort the process at interpreter teardown otherwise

    sync_device = (device if device.type == 'cuda' else torch.device('cpu')) if get_world_size() > 1 else None
    try:
        training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)
    except RuntimeError:
        pass # already synced once in this process (e.g. init() called twice)
    return device

#----------------------------------------------------------------------------
# How long a rank waits for the others in one collective before it gives up.

TIMEOUT_ENV = 'EDM_COLLECTIVE_TIMEOUT'
DEFAULT_TIMEOUT = 300 # seconds

def collective_timeout():
    """Seconds a collective waits for the other ranks: $EDM_COLLECTIVE_TIMEOUT, else DEFAULT_TIMEOUT."""
    value = os.environ.get(TIMEOUT_ENV, '')
    if value == '':
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ValueError(f'{TIMEOUT_ENV}={value} must be a positive number of seconds')
    return seconds

#----------------------------------------------------------------------------

def finish():
    """Destroy the process group, if any; the scripts call it when they end normally (idempotent; with gloo also at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == 'gloo':
            # gloo's worker threads may still hold the last collective's tensors, and need the GIL to free
            # them; PyTorch 2.1's ProcessGroupGloo destructor joins them while holding it (a deadlock).
            time.sleep(0.05)
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------

def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

#----------------------------------------------------------------------------

def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

#----------------------------------------------------------------------------

class PeerError(ConnectionError):
    """A collective failed because another process of the run stopped or stopped answering; that process reports why."""

_DIST_ERRORS = tuple(getattr(torch.distributed, name) for name in ('DistError',) if hasattr(torch.distributed, name))

def is_peer_error(err):
    """True when `err` is a failed collective of a multi-process run (a peer gone, or silent past the timeout)."""
    if isinstance(err, PeerError):
        return True
    if get_world_size() == 1 or not isinstance(err, RuntimeError):
        return False
    text = str(err)
    return isinstance(err, _DIST_ERRORS) or any(word in text for word in ('gloo', 'Gloo', 'NCCL', 'Connection closed', 'Connection reset', 'Timed out'))

def peer_error_message(err):
    """One line for a failed collective, naming this rank and the timeout."""
    timed_out = 'timed out' in str(err).lower() or 'timeout' in str(err).lower()
    if timed_out:
        return f'rank {get_rank()} had no answer from another process of this run within {collective_timeout():g} s ({TIMEOUT_ENV})'
    return f'another process of this run stopped, so rank {get_rank()} stops too; its own error, if it printed one, says why'

def _collective(op, *args):
    try:
        op(*args)
    except RuntimeError as err: # gloo: the peer closed its connection, or the timeout passed
        raise PeerError(peer_error_message(err)) from err

def barrier():
    if torch.distributed.is_initialized():
        _collective(torch.distributed.barrier)

def all_reduce_sum(tensor):
    """Sum `tensor` in place over all ranks."""
    if torch.distributed.is_initialized():
        _collective(torch.distributed.all_reduce, tensor)

#----------------------------------------------------------------------------

def rank0_first(load):
    """Call `load()` on rank 0 first (it downloads into the cache), then on the other ranks."""
    if get_rank() != 0:
        barrier()
    result = load()
    if get_rank() == 0:
        barrier()
    return result

#----------------------------------------------------------------------------

def should_stop():
    return False

#----------------------------------------------------------------------------

def update_progress(cur, total):
    _ = cur, total

#----------------------------------------------------------------------------

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

#----------------------------------------------------------------------------
