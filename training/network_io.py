"""Loading network pickles (paths or URLs) with clear errors."""


import torch

import dnnlib
from torch_utils import persistence
from training import safetensors_io

# What the samplers, generate.py and fid.py use of a network: the preconditioners all have these.
NETWORK_ATTRS = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')
EDM2_NETWORK_ATTRS = NETWORK_ATTRS[:3] # EDM2's Precond states no noise range (training/generation_edm2.py samples it)

#----------------------------------------------------------------------------

def load_network_pkl(network_pkl, key='ema', verbose=True, allow_code=False):
    """Return `pickle.load(f)[key]` for a network pickle given as a path or URL, or the network of a
    .safetensors file (training/safetensors_io.py).

    Safe by default: persistent objects are rebuilt from this project's classes and
    the source they carry is never run (torch_utils/safe_pickle.py); allow_code=True
    unpickles in full. Raises ValueError (or IOError for failed downloads) with a
    one-line message naming the file when it is missing, unreadable, not a pickle,
    names code that safe loading refuses, lacks `key`, or holds something other than
    a preconditioned network (a module with NETWORK_ATTRS).
    """
    return load_network_data(network_pkl, key=key, verbose=verbose, allow_code=allow_code)[key]

def _read_network_file(network_pkl, key, verbose, allow_code):
    path = dnnlib.util.open_url(network_pkl, verbose=verbose, return_filename=True)
    if safetensors_io.is_safetensors(path):
        return {key: safetensors_io.load_network(path)}
    with dnnlib.util.open_regular(path) as f:
        return persistence.load(f, allow_code=allow_code, name=network_pkl)

def _starts_as_zip(path):
    """Does the file at `path` begin as a zip archive (torch.save's format)? Its first bytes, not its tail: a pickle
    may carry a zip inside."""
    try:
        with dnnlib.util.open_regular(path) as f:
            return f.read(4) == b'PK\x03\x04'
    except (OSError, ValueError):
        return False

def load_network_data(network_pkl, key='ema', verbose=True, allow_code=False):
    """The whole dict of a network pickle (the network under `key` checked as load_network_pkl does)."""
    try:
        data = _read_network_file(network_pkl, key, verbose, allow_code)
    except FileNotFoundError:
        raise ValueError(f'network pickle not found: {network_pkl}') from None
    except IsADirectoryError:
        raise ValueError(f'network pickle is a directory, not a file: {network_pkl}') from None
    except PermissionError:
        raise ValueError(f'network pickle is not readable: {network_pkl}') from None
    except dnnlib.util.DownloadError as err:
        raise IOError(str(err)) from None
    except Exception as err: # pylint: disable=broad-exception-caught
        if _starts_as_zip(network_pkl): # torch.save's format, as train.py's states
            raise ValueError(f'{network_pkl} is a training state (torch.save), not a network pickle: '
                             f'use the run\'s network-snapshot-*.pkl') from None
        if isinstance(err, OSError) and dnnlib.util.is_url(network_pkl) and network_pkl in str(err):
            raise IOError(' '.join(str(err).split())) from None # a failed download names the URL
        if isinstance(err, ValueError) and network_pkl in str(err) and '\n' not in str(err):
            raise ValueError(str(err)) from None # already one line naming the file
        raise ValueError(persistence.load_error_message(network_pkl, 'network pickle', err)) from None
    if not isinstance(data, dict) or key not in data:
        found = ', '.join(map(str, data.keys())) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{network_pkl} holds no {key!r} network (found: {found[:200]})')
    net = data[key]
    missing = [name for name in (EDM2_NETWORK_ATTRS if type(net).__name__ == 'Precond' else NETWORK_ATTRS) if not hasattr(net, name)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise ValueError(f'{network_pkl}: {key!r} holds a {type(net).__name__}, not a preconditioned network'
                         + (f' (it lacks {", ".join(missing)})' if missing else ''))
    return data

#----------------------------------------------------------------------------

def rebuild_network(net):
    """Rebuild a loaded network from this project's classes and copy its weights by name.

    Published pickles run the source code they carry; rebuilding gives them
    our fast paths (SDPA attention, channels-last, torch.compile). The network
    is rebuilt from its recorded class name and init_args/init_kwargs (the use
    the persistence format intends) and must then have exactly the same
    parameter and buffer names and shapes. Returns `net` itself, unchanged,
    when its class is not one of ours or the rebuilt network does not match.
    """
    import torch
    from torch_utils import misc, persistence
    from training import networks

    from training import class_names
    name = f'training.networks.{type(net).__name__}'
    if name not in class_names.NETWORK_CLASSES or not persistence.is_persistent(net) or not isinstance(net, torch.nn.Module):
        return net
    cls = getattr(networks, type(net).__name__)
    try: # the arguments come from the file: checked against its weights before anything of their size is allocated
        shapes = {key: tuple(t.shape) for key, t in net.state_dict().items()}
        class_names.check_construction('the network', cls, net.init_args, net.init_kwargs, shapes)
        rebuilt = cls(*net.init_args, **net.init_kwargs)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return net
    src = {name: t.shape for name, t in misc.named_params_and_buffers(net)}
    dst = {name: t.shape for name, t in misc.named_params_and_buffers(rebuilt)}
    if src != dst:
        return net
    misc.copy_params_and_buffers(net, rebuilt, require_all=True)
    params = list(net.parameters())
    device = params[0].device if params else torch.device('cpu')
    rebuilt = rebuilt.to(device).train(net.training)
    if params and not any(p.requires_grad for p in params):
        rebuilt.requires_grad_(False)
    return rebuilt

#----------------------------------------------------------------------------
