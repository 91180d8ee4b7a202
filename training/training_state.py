"""What a run keeps between processes: stop requests (SIGTERM, Ctrl-C), the
random generator states of every rank, and the run's files (written whole,
appended line by line)."""

import contextlib
import os
import random
import signal

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Stop requests (SIGTERM from a scheduler, Ctrl-C): finish the current step,
# write a snapshot and a state dump, then return.

class StopRequest:
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

_stop_group = None # gloo process group for the stop flag, so that checking it never waits for the GPU

def agree_to_stop(local_request):
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
# Random number generator states, per rank, for exact resumption.

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
# Files of a run.

def snapshot_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'network-snapshot-{cur_nimg//1000:06d}.pkl')

def state_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'training-state-{cur_nimg//1000:06d}.pt')

def samples_path(run_dir, cur_nimg):
    return os.path.join(run_dir, f'samples-{cur_nimg//1000:06d}.png')

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
