"""Multi-node runs on one machine: two `torchrun` nodes of one process each
(`--nnodes=2`, rendezvous on 127.0.0.1, gloo) train the same weights as one
node of two processes, and write the same images and FID as one process; a
node that dies ends the other with an error naming its rank."""

import glob
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import psutil
import pytest
import torch

from conftest import ROOT, free_port, make_tiny_net, run_script, run_torchrun, subprocess_env, write_network_pkl
import fid_detector

#----------------------------------------------------------------------------
# Two nodes on loopback: one torchrun per node, started together, output in files (no pipe to fill).

def start_nodes(args, out_dir, env=None, rendezvous='static'):
    """Start `torchrun --nnodes=2 --node_rank=0|1 --nproc_per_node=1 <args>`; returns [(Popen, output path)]."""
    port = free_port()
    if rendezvous == 'static':
        meeting = ['--master_addr=127.0.0.1', f'--master_port={port}']
    else:
        meeting = ['--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}', f'--rdzv_id=test{port}']
    nodes = []
    for node_rank in range(2):
        node = ['--nnodes=2', '--nproc_per_node=1'] + ([f'--node_rank={node_rank}'] if rendezvous == 'static' else [])
        # '--' ends torchrun's options: it would take the script's --num for its own --numa-binding.
        cmd = [sys.executable, '-m', 'torch.distributed.run'] + node + meeting + ['--'] + [str(a) for a in args]
        out_path = os.path.join(out_dir, f'node{node_rank}.txt')
        with open(out_path, 'w') as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        nodes.append((proc, out_path))
    return nodes

def read(path):
    with open(path) as f:
        return f.read()

def node_processes(proc):
    """A node's torchrun and its workers (torchrun starts each worker in a session of its own)."""
    try:
        agent = psutil.Process(proc.pid)
        return [agent] + agent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []

def signal_node(proc, sig):
    for process in node_processes(proc):
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass

def wait_nodes(nodes, timeout):
    """Wait for every node; kills what is left after `timeout` seconds. Returns the outputs."""
    deadline = time.time() + timeout
    try:
        for proc, _ in nodes:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                signal_node(proc, signal.SIGKILL)
                proc.wait()
    return [read(path) for _, path in nodes]

def run_nodes(args, out_dir, env=None, rendezvous='static', timeout=120):
    nodes = start_nodes(args, out_dir, env=env, rendezvous=rendezvous)
    outputs = wait_nodes(nodes, timeout)
    assert all(proc.returncode == 0 for proc, _ in nodes), '\n'.join(outputs)
    return outputs

#----------------------------------------------------------------------------
# Tiny inputs: a zip of 16 8x8 images, a small network pickle, the stand-in FID detector.

def random_images(num, seed):
    return np.random.RandomState(seed).randint(0, 256, size=[num, 8, 8, 3], dtype=np.uint8)

@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('inputs')
    data = root / 'tiny8.zip'
    with zipfile.ZipFile(data, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, image in enumerate(random_images(16, seed=0)):
            with z.open(f'00000/img{i:08d}.png', 'w') as f:
                PIL.Image.fromarray(image).save(f, format='png')
    detector = fid_detector.ProjectionDetector(feature_dim=16)
    with open(root / 'detector.pkl', 'wb') as f:
        pickle.dump(detector, f)
    return dict(root=root, data=str(data), net=write_network_pkl(root / 'net.pkl', make_tiny_net(label_dim=4)),
                detector=detector, detector_pkl=str(root / 'detector.pkl'))

#----------------------------------------------------------------------------
# Training: 1 kimg in 32 steps of 32 images (16 per process), one resolution level of 8 channels;
# a tick every 16 steps, and a training state with each tick (fractional ticks name files by kimg to 3 decimals).

TINY = ['--cbase=8', '--cres=1', '--batch=32', '--tick=0.5', '--snap=2', '--dump=1', '--augment=0', '--device=cpu', '--seed=0',
        '--workers=0', '--duration=0.001']

def train_args(outdir, data, *extra):
    return ['train.py', f'--outdir={outdir}', f'--data={data}'] + TINY + list(extra)

def run_dir(outdir):
    (path,) = glob.glob(os.path.join(str(outdir), '0*'))
    return path

def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)

def load_ema(path):
    with open(path, 'rb') as f:
        return pickle.load(f)['ema']

def assert_same_state_dicts(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'

def assert_same_training(run_a, run_b):
    """The final training states of two runs hold the same weights, EMA and optimizer moments; so do the final snapshots."""
    a, b = (load_state(os.path.join(run, 'training-state-000001.024.pt')) for run in (run_a, run_b))
    assert a['cur_nimg'] == b['cur_nimg'] == 32 * 32 # 1 kimg, in whole steps
    assert_same_state_dicts(a['net'].state_dict(), b['net'].state_dict())
    assert_same_state_dicts(a['ema'].state_dict(), b['ema'].state_dict())
    assert_same_state_dicts(a['optimizer_state']['state'][0], b['optimizer_state']['state'][0])
    assert_same_state_dicts(a['ema'].state_dict(), load_ema(os.path.join(run_b, 'network-snapshot-000001.024.pkl')).state_dict())

@pytest.fixture(scope='module')
def one_node(inputs, tmp_path_factory):
    """One node of two processes."""
    outdir = tmp_path_factory.mktemp('one-node')
    run_torchrun(train_args(outdir, inputs['data']), nproc=2, timeout=120)
    return run_dir(outdir)

def test_training_on_two_nodes_equals_two_processes_on_one(one_node, inputs, tmp_path):
    run_nodes(train_args(tmp_path / 'runs', inputs['data']), tmp_path)
    two_nodes = run_dir(tmp_path / 'runs')
    assert os.path.basename(two_nodes) == os.path.basename(one_node) == '00000-tiny8-uncond-ddpmpp-edm-cpu2-batch32-fp32'
    assert sorted(os.listdir(two_nodes)) == sorted(os.listdir(one_node))
    assert_same_training(one_node, two_nodes)

def test_two_nodes_resume_the_state_of_one(one_node, inputs, tmp_path):
    state = os.path.join(one_node, 'training-state-000000.544.pt')
    assert load_state(state)['cur_nimg'] == 17 * 32 # tick 0 is the first step, tick 1 the next 16
    run_nodes(train_args(tmp_path / 'runs', inputs['data'], f'--resume={state}'), tmp_path)
    assert_same_training(one_node, run_dir(tmp_path / 'runs'))

#----------------------------------------------------------------------------
# Sampling and FID: every file and value of two nodes equals that of one process.

def file_bytes(folder):
    files = {}
    for path in glob.glob(os.path.join(folder, '**', '*.png'), recursive=True):
        with open(path, 'rb') as f:
            files[os.path.relpath(path, folder)] = f.read()
    return files

def test_generate_on_two_nodes_writes_the_bytes_of_one_process(inputs, tmp_path):
    args = ['generate.py', f'--network={inputs["net"]}', '--seeds=0-4,1000', '--batch=2', '--steps=2', '--device=cpu']
    run_script(args + [f'--outdir={tmp_path / "one"}'])
    run_nodes(args + [f'--outdir={tmp_path / "two"}'], tmp_path) # static rendezvous: --master_addr, --master_port
    one, two = file_bytes(tmp_path / 'one'), file_bytes(tmp_path / 'two')
    assert sorted(one) == ['000000.png', '000001.png', '000002.png', '000003.png', '000004.png', '001000.png']
    assert one == two

def write_folder(folder, images):
    os.makedirs(folder)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(os.path.join(folder, f'img{i:04d}.png'))
    return str(folder)

def test_fid_calc_on_two_nodes_gives_the_value_of_one_process(inputs, tmp_path):
    import fid # pylint: disable=import-outside-toplevel
    detector, images, ref_images = inputs['detector'], random_images(40, seed=1), random_images(40, seed=2) // 2
    def stats(x):
        features = fid_detector.numpy_features(x, detector)
        return features.mean(axis=0), np.cov(features, rowvar=False)
    mu_ref, sigma_ref = stats(ref_images)
    np.savez(tmp_path / 'ref.npz', mu=mu_ref, sigma=sigma_ref)
    args = ['fid.py', 'calc', '--images', write_folder(tmp_path / 'images', images), '--ref', tmp_path / 'ref.npz', '--num', 40,
            '--batch', 8, '--detector', inputs['detector_pkl'], '--allow-code', '--device', 'cpu', '--workers', 0]
    one = run_script(args).stdout.strip().splitlines()[-1]
    # The c10d rendezvous numbers the nodes in the order they join: rank 0, which prints the value, may be either.
    (two,) = [output.strip().splitlines()[-1] for output in run_nodes(args, tmp_path, rendezvous='c10d') if 'Calculating FID' in output]
    assert two == one
    expected = fid.calculate_fid_from_inception_stats(*stats(images), mu_ref, sigma_ref)
    assert expected > 1 and float(one) == pytest.approx(expected, rel=1e-5) # printed with 6 significant digits

#----------------------------------------------------------------------------
# A node that dies (SIGKILL of its torchrun and worker) or hangs (SIGSTOP) during training.

def wait_for_line(path, prefix, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(line.startswith(prefix) for line in read(path).splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f'no line starting with {prefix!r} within {timeout} s:\n{read(path)}')

@pytest.mark.parametrize('fate', ['killed', 'frozen'])
def test_a_lost_node_ends_the_other_naming_its_rank(inputs, tmp_path, fate):
    # Killed: its sockets close and rank 0 stops at once. Frozen (a hung machine, or a network that drops
    # packets silently): rank 0 gives up after EDM_COLLECTIVE_TIMEOUT seconds.
    nodes = start_nodes(train_args(tmp_path / 'runs', inputs['data'], '--duration=1'), tmp_path,
                        env=subprocess_env(EDM_COLLECTIVE_TIMEOUT=10))
    try:
        wait_for_line(nodes[0][1], 'tick 0', timeout=90)
        signal_node(nodes[1][0], signal.SIGKILL if fate == 'killed' else signal.SIGSTOP)
        start = time.time()
        nodes[0][0].wait(timeout=60)
        elapsed = time.time() - start
    finally:
        output = wait_nodes(nodes, timeout=0)[0]
    assert nodes[0][0].returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith('Error: ')]
    if fate == 'killed':
        assert errors == ['Error: another process of this run stopped, so rank 0 stops too; its own error, if it printed one, says why'], output
    else:
        assert errors == ['Error: rank 0 had no answer from another process of this run within 10 s (EDM_COLLECTIVE_TIMEOUT)'], output
        assert 10 <= elapsed < 40, elapsed
