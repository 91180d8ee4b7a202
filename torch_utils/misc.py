"""PyTorch plumbing: cached constants, shape checks, the infinite data
sampler, copying weights by name, DDP helpers and the module summary."""

import contextlib
import os
import re
import warnings

import numpy as np
import psutil
import torch

import dnnlib

#----------------------------------------------------------------------------
# Device choice: a value passed down from the command line.

def choose_device(device=None):
    """`device` as a torch.device; None means CUDA when available, else the CPU."""
    if device is None or device == '':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f'--device={device} is not a device name (such as cpu, cuda, cuda:1 or mps)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} requested but CUDA is not available; use --device=cpu')
    if device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise ValueError(f'device {device} requested but MPS is not available; use --device=cpu')
    return device

#----------------------------------------------------------------------------
# CPU threads: every physical core this process may use, unless the user chose (OMP_NUM_THREADS).

def cpu_threads(num_processes=1):
    """Threads per process for CPU work: the physical cores this process may use, shared by the `num_processes`
    local processes, at least one. None when OMP_NUM_THREADS is set: the user chose."""
    if os.environ.get('OMP_NUM_THREADS'):
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    cores = min(usable, psutil.cpu_count(logical=False) or usable)
    return max(1, cores // max(num_processes, 1))

def set_cpu_threads(num_processes=1):
    """torch.set_num_threads(cpu_threads(...)) unless OMP_NUM_THREADS is set; returns the thread count in use."""
    threads = cpu_threads(num_processes)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

#----------------------------------------------------------------------------
# Cached construction of constant tensors. Avoids CPU=>GPU copy when the
# same constant is used multiple times.

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """constant() with the dtype and device of tensor `ref` by default (the EDM2 release's code, which its
    pickles carry and run when loaded in full, calls it)."""
    return constant(value, shape=shape, dtype=(ref.dtype if dtype is None else dtype),
                    device=(ref.device if device is None else device), memory_format=memory_format)

#----------------------------------------------------------------------------
# Symbolic assert for tensor shapes; None matches any size.

def assert_shape(tensor, ref_shape):
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            pass
        elif isinstance(ref_size, torch.Tensor):
            torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            torch._assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

#----------------------------------------------------------------------------
# Sampler for torch.utils.data.DataLoader that loops over the dataset
# indefinitely, shuffling items as it goes.

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless shuffled index stream. Every rank walks the same global order and
    takes every num_replicas-th index; after position i, order[i] is swapped
    with a random earlier position within a window of window_size * len.

    To resume, `start_idx` skips the first positions (by replaying the swaps),
    and `start_state` (from state_at()) jumps straight to a saved position.
    """

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, window_size=0.5, start_idx=0, start_state=None):
        if len(dataset) <= 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas <= 0 or not 0 <= rank < num_replicas or not 0 <= window_size <= 1:
            raise ValueError('InfiniteSampler: invalid rank, num_replicas or window_size')
        try:
            super().__init__(dataset)
        except TypeError: # newer torch versions take no data_source
            super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self.start_idx = start_idx      # Global position to resume from (images consumed by all ranks).
        self.start_state = start_state  # Saved walk state at or before start_idx, or None.

    def _initial(self):
        order = np.arange(len(self.dataset))
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        return order, rnd, window, 0

    def _restore(self, state):
        order, rnd, window, _ = self._initial()
        if len(state['order']) != order.size:
            raise ValueError(f'sampler state is for {len(state["order"])} images, the dataset has {order.size}')
        order = np.array(state['order'], dtype=order.dtype)
        if rnd is not None:
            rnd.set_state(state['rnd_state'])
        return order, rnd, window, int(state['idx'])

    @staticmethod
    def _step(order, rnd, window, idx):
        """The swap that follows position idx."""
        if window >= 2:
            i = idx % order.size
            j = (i - rnd.randint(window)) % order.size
            order[i], order[j] = order[j], order[i]

    def state_at(self, idx, state=None):
        """The walk state at global position `idx`, replayed from `state` (or from the start)."""
        order, rnd, window, cur = self._initial() if state is None or int(state['idx']) > idx else self._restore(state)
        while cur < idx:
            self._step(order, rnd, window, cur)
            cur += 1
        return dict(idx=cur, order=order.copy(), rnd_state=(rnd.get_state() if rnd is not None else None))

    def __iter__(self):
        use_state = self.start_state is not None and int(self.start_state['idx']) <= self.start_idx
        order, rnd, window, idx = self._restore(self.start_state) if use_state else self._initial()
        while True:
            if idx >= self.start_idx and idx % self.num_replicas == self.rank:
                yield order[idx % order.size]
            self._step(order, rnd, window, idx)
            idx += 1

#----------------------------------------------------------------------------
# Utilities for operating with torch.nn.Module parameters and buffers.

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter and buffer of `dst_module` that `src_module` has under the same name."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(named_params_and_buffers(src_module))
    if require_all:
        missing = [name for name, _ in named_params_and_buffers(dst_module) if name not in src_tensors]
        if missing:
            raise ValueError(f'source network lacks {len(missing)} parameters/buffers: {", ".join(missing[:10])}' + (' ...' if len(missing) > 10 else ''))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src_tensors:
            if src_tensors[name].shape != tensor.shape:
                raise ValueError(f'shape mismatch for {name}: source {tuple(src_tensors[name].shape)}, destination {tuple(tensor.shape)}')
            tensor.copy_(src_tensors[name])

#----------------------------------------------------------------------------
# Context manager for easily enabling/disabling DistributedDataParallel
# synchronization.

@contextlib.contextmanager
def ddp_sync(module, sync):
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

#----------------------------------------------------------------------------
# Check DistributedDataParallel consistency across processes.

def check_ddp_consistency(module, ignore_regex=None):
    assert isinstance(module, torch.nn.Module)
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            raise RuntimeError(f'DDP consistency check failed for {fullname}')

#----------------------------------------------------------------------------
# Print summary table of module hierarchy.

@torch.no_grad()
def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    assert isinstance(module, torch.nn.Module)
    assert not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    # Register hooks.
    entries = []
    nesting = [0]
    def pre_hook(_mod, _inputs):
        nesting[0] += 1
    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))
    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]

    # Run module.
    outputs = module(*inputs)
    for hook in hooks:
        hook.remove()

    # Identify unique outputs, parameters, and buffers.
    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}

    # Filter out redundant entries.
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.unique_outputs)]

    # Construct table.
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    rows += [['---'] * len(rows[0])]
    param_total = 0
    buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs]
        rows += [[
            name + (':0' if len(e.outputs) >= 2 else ''),
            str(param_size) if param_size else '-',
            str(buffer_size) if buffer_size else '-',
            (output_shapes + ['-'])[0],
            (output_dtypes + ['-'])[0],
        ]]
        for idx in range(1, len(e.outputs)):
            rows += [[name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]]]
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * len(rows[0])]
    rows += [['Total', str(param_total), str(buffer_total), '-', '-']]

    # Print table.
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------
# Suppress noisy tracer warnings (used by the augmentation pipeline's callers).

@contextlib.contextmanager
def suppress_tracer_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield
