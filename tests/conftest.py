"""Shared test helpers: fixture paths, subprocess runners, small networks."""

import os
import pickle
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1') # the tests never download (diffusers' VAE weights), here or in subprocesses


def fixture_file(name):
    """Path of a reference fixture in tests/fixtures; a missing one fails the test."""
    path = os.path.join(FIXTURES, name)
    if not os.path.isfile(path):
        pytest.fail(f'reference fixture {name} not found in {FIXTURES}', pytrace=False)
    return path


def sample_indices(numel, count=128):
    """The flat indices at which tests/fixtures keeps a large tensor: `count` of them, evenly spread."""
    import numpy as np
    return np.unique(np.linspace(0, numel - 1, min(numel, count)).round().astype(np.int64))


def single_thread():
    """Generator for a fixture: torch uses one thread while it is active (tiny networks; many threads only contend)."""
    import torch
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env(**extra):
    """Environment for a child process with only the project on the path, single-threaded."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env['PYTHONPATH'] = ROOT
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(args, cwd=None, check=True, timeout=600, env=None):
    """Run `python <args...>` from the project root; returns the CompletedProcess (text output)."""
    cmd = [sys.executable] + [str(a) for a in args]
    res = subprocess.run(cmd, cwd=cwd or ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f'command failed ({res.returncode}): {" ".join(cmd)}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}')
    return res


def run_torchrun(args, nproc=2, cwd=None, check=True, timeout=600, env=None):
    """Run a script under `torchrun --nproc_per_node=N` on loopback with the gloo backend."""
    torchrun_args = ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
                     f'--master_port={free_port()}']
    return run_script(torchrun_args + list(args), cwd=cwd, check=check, timeout=timeout, env=env)


def make_tiny_net(label_dim=0, img_channels=3, img_resolution=8, precond='EDMPrecond', seed=0):
    """A small DDPM++-style network with random (perturbed) weights."""
    import torch
    from training import networks
    torch.manual_seed(seed)
    net = getattr(networks, precond)(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                     model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                     attn_resolutions=[4], dropout=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


def make_tiny_vae(folder, safe_serialization=True):
    """A small diffusers AutoencoderKL (factor 2, 4 latent channels) with random weights, saved into `folder` as
    save_pretrained does; skips the test without diffusers."""
    diffusers = pytest.importorskip('diffusers')
    import torch
    torch.manual_seed(0)
    vae = diffusers.models.AutoencoderKL(down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
                                         block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(str(folder), safe_serialization=safe_serialization)
    return vae.eval()


def write_network_pkl(path, net):
    """Write a network pickle in the layout train.py uses."""
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=None), f)
    return str(path)


def make_recipe_net(config, recipe):
    """The network of a net-*.npz fixture config with the reference's parameters: constructed under
    torch.manual_seed(recipe['seed']), then recipe['perturb_std'] * randn_like(p) added to each parameter
    in order under torch.manual_seed(recipe['perturb_seed']). The global random state is left as it was."""
    import torch
    from training import networks
    config = dict(config)
    cls = getattr(networks, config.pop('class_name'))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe['seed'])
        net = cls(**config)
        torch.manual_seed(recipe['perturb_seed'])
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * recipe['perturb_std'])
    return net


def digest(value):
    """float64 [sum, sum of squares, values at sample_indices()] of an array, as tests/fixtures keeps parameters."""
    import numpy as np
    value = np.asarray(value, dtype=np.float64).ravel()
    return np.concatenate([[value.sum(), (value ** 2).sum()], value[sample_indices(value.size)]])
