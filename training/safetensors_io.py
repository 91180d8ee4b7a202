"""Networks as .safetensors: the weights (parameters and buffers) of a
network, and in the header's metadata the arguments that construct it
(class_name, init_args, init_kwargs as JSON). The format carries no code:
loading builds one of this project's network classes (training/class_names.py)
and copies the weights into it. Needs the optional `safetensors` package."""

import json
import os

import torch

import dnnlib
from training import class_names

#----------------------------------------------------------------------------

FORMAT = 'edm-network/1'        # metadata['format']: what the file holds.
MAX_METADATA = 1 << 16          # Bytes of JSON in the construction arguments.

def is_safetensors(path):
    """Does a local file hold safetensors (an 8-byte header length, then a JSON header)?"""
    with dnnlib.util.open_regular(path) as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)

def _package():
    try:
        import safetensors.torch # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ValueError('.safetensors files need the safetensors package (pip install safetensors)') from None
    return safetensors

def class_name_of(net):
    """The dotted class name that a .safetensors header records for `net` (one of NETWORK_CLASSES)."""
    name = f'{type(net).__module__}.{type(net).__name__}'
    return class_names.check_class_name(name, class_names.NETWORK_CLASSES, f'a {type(net).__name__} network')

def save_network(net, path):
    """Write `net` (a network with init_args/init_kwargs, as this project's networks record them) to `path`."""
    safetensors = _package()
    try:
        init_args, init_kwargs = list(net.init_args), dict(net.init_kwargs)
    except AttributeError:
        raise ValueError(f'{type(net).__name__} records no init_args/init_kwargs, so a .safetensors file could not rebuild it') from None
    metadata = dict(format=FORMAT, class_name=class_name_of(net), init_args=json.dumps(init_args), init_kwargs=json.dumps(init_kwargs))
    tensors = {name: t.detach().to('cpu', copy=True).contiguous() for name, t in net.state_dict().items()}
    with dnnlib.util.atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask) # as open() would create it

def load_network(path):
    """The network of a .safetensors file: its class checked against NETWORK_CLASSES, its shapes against the
    file before anything is allocated, in eval mode without gradients. Raises ValueError naming the file."""
    safetensors = _package()
    with safetensors.safe_open(path, framework='pt') as f:
        metadata = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        if metadata.get('format') != FORMAT:
            raise ValueError(f'{path} is a .safetensors file without the construction arguments of a network (format {FORMAT})')
        if sum(len(v) for v in metadata.values()) > MAX_METADATA:
            raise ValueError(f'{path}: its construction arguments exceed {MAX_METADATA} bytes')
        cls = class_names.network_class(metadata.get('class_name'), path)
        init_args, init_kwargs = json.loads(metadata.get('init_args', '[]')), json.loads(metadata.get('init_kwargs', '{}'))
        if not isinstance(init_args, list) or not isinstance(init_kwargs, dict):
            raise ValueError(f'{path}: init_args must be a JSON list and init_kwargs a JSON object')
        class_names.check_construction(path, cls, init_args, init_kwargs, shapes)
        net = cls(*init_args, **init_kwargs)
        class_names.same_shapes(path, cls, {name: tuple(t.shape) for name, t in net.state_dict().items()}, shapes)
        net.load_state_dict({name: f.get_tensor(name) for name in shapes}, strict=True)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
