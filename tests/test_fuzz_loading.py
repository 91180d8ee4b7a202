"""Fuzzing the loaders as an attacker would: thousands of mutations (byte flips,
inserted and deleted opcodes, size fields set huge, deep nesting) of a real
network pickle, a training state and detector files, each loaded without
--allow-code. None may crash, hang, run code or write a file; each ends in a
correct load or in one line naming the file.

One worker process imports torch once; it forks a child per batch of cases,
and the child arms a timer per case (a hang kills it with SIGALRM) and an audit
hook that reports code execution and file writes. A batch whose child dies is
replayed one case per child to name the case. Set FUZZ_SEED to replay a run."""

import io
import os
import pickle
import random
import resource
import signal
import sys
import zipfile

import numpy as np
import torch


SEED = int(os.environ.get('FUZZ_SEED', '0'))
CASE_SECONDS = 20       # A case that runs longer is a hang.
BATCH = 50              # Cases per forked child.
MEMORY_HEADROOM = 4 << 30 # Address space a child may add: a larger allocation is a MemoryError, which must be one line too.

#----------------------------------------------------------------------------
# The files mutated: real ones, written by our code.

def _small_net():
    from training import networks
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=4, img_channels=1, label_dim=2, model_type='SongUNet', model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[], dropout=0)
    return net.eval().requires_grad_(False)

def _network_pickle():
    from training import augment, loss
    data = dict(ema=_small_net(), loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(p=0.1),
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'))
    return pickle.dumps(data)

def _training_state():
    net = _small_net().train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn([2, 1, 4, 4]), torch.ones([2]), torch.eye(2)).square().mean().backward()
    optimizer.step()
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.Random(0).getstate())
    state = dict(net=net, ema=None, optimizer_state=optimizer.state_dict(), cur_nimg=1000, cur_tick=2, tick_start_nimg=900,
                 sampler_seed=0, sampler_idx=1000, sampler_state=dict(idx=990, order=np.arange(7), rnd_state=np.random.RandomState(0).get_state()),
                 rng_states=[rng], loss_scale=None, batch_size=10, world_size=1)
    f = io.BytesIO()
    torch.save(state, f)
    return f.getvalue()

def _detector_pickle():
    import fid_detector
    return pickle.dumps(fid_detector.ProjectionDetector(feature_dim=4))

class _Scripted(torch.nn.Module):
    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return images.float().mean([2, 3])

def _detector_torchscript():
    import warnings
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.jit.save(torch.jit.script(_Scripted()), f)
    return f.getvalue()

#----------------------------------------------------------------------------
# Mutations.

_SIZED_OPCODES = {b'B': 4, b'X': 4, b'T': 4, b'\x8e': 8, b'\x8d': 8, b'\x96': 8, b'\x95': 8, b'\x8b': 4, b'\x8a': 1, b'C': 1, b'\x8c': 1}
_OPCODES = [bytes([op.code.encode('latin-1')[0]]) for op in __import__('pickletools').opcodes]

def _flip(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)

def _insert_opcode(rng, data):
    pos = rng.randrange(len(data))
    return data[:pos] + rng.choice(_OPCODES) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 9))) + data[pos:]

def _delete(rng, data):
    pos = rng.randrange(len(data))
    return data[:pos] + data[pos + rng.randint(1, 16):]

def _huge_size(rng, data):
    """A length field after a sized opcode (or any 4 or 8 bytes) set to a huge value."""
    positions = [i for i in range(len(data) - 9) if data[i:i + 1] in _SIZED_OPCODES]
    pos = rng.choice(positions) + 1 if positions and rng.random() < 0.8 else rng.randrange(max(len(data) - 9, 1))
    width = _SIZED_OPCODES.get(data[pos - 1:pos], rng.choice([4, 8]))
    value = rng.choice([(1 << (8 * width - 1)) - 1, (1 << (8 * width)) - 1, (1 << 31) - 1, 1 << 40])
    value &= (1 << (8 * width)) - 1
    return data[:pos] + value.to_bytes(width, 'little') + data[pos + width:]

def _nest(rng, data):
    """Deeply nested tuples (as a dict key, a set item or a value), or deeply nested lists, inserted somewhere."""
    depth = rng.choice([200, 5000, 100000])
    kind = rng.randrange(4)
    if kind == 0:
        payload = b'}' + b'N' + b'\x85' * depth + b'Ns0' # {((...),): None}, popped
    elif kind == 1:
        payload = b'\x8f(' + b'N' + b'\x85' * depth + b'\x900' # set((...),), popped
    elif kind == 2:
        payload = b'N' + b'\x85' * depth # a value in place of whatever follows
    else:
        payload = b']' * depth + b'a' * (depth - 1) # [[[...]]]
    pos = rng.randrange(len(data))
    return data[:pos] + payload + data[pos:]

MUTATIONS = [_flip, _insert_opcode, _delete, _huge_size, _nest]

def _mutate_zip_member(rng, data, member_suffix):
    """A torch.save archive whose member (data.pkl) is mutated and stored again, so that the zip itself stays valid."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            member = src.read(info)
            if info.filename.endswith(member_suffix):
                member = rng.choice(MUTATIONS)(rng, member)
            dst.writestr(info.filename, member)
    return out.getvalue()

def make_cases(count, seed):
    """[(kind, bytes)] of `count` mutated files, reproducible from `seed`."""
    rng = random.Random(seed)
    sources = dict(network=_network_pickle(), state=_training_state(), detector=_detector_pickle(), script=_detector_torchscript())
    plan = [('network', 0.45), ('state', 0.3), ('detector', 0.15), ('script', 0.1)]
    cases = []
    for kind, share in plan:
        for _ in range(int(count * share)):
            data = sources[kind]
            if kind in ('state', 'script') and rng.random() < 0.7:
                data = _mutate_zip_member(rng, data, 'data.pkl' if kind == 'state' else rng.choice(['data.pkl', 'constants.pkl']))
            else:
                for _ in range(rng.choice([1, 1, 2, 3])):
                    data = rng.choice(MUTATIONS)(rng, data)
            cases.append((kind, data))
    return cases

#----------------------------------------------------------------------------
# Loading in forked children.

def _load(kind, path):
    if kind == 'network':
        from training.network_io import load_network_pkl
        return load_network_pkl(path, verbose=False)
    if kind == 'state':
        from training.training_loop import load_state_dump
        return load_state_dump(path)
    import fid
    return fid.load_detector(path, device='cpu', verbose=False)

_FORBIDDEN = ('os.system', 'os.exec', 'os.posix_spawn', 'os.spawn', 'os.fork', 'os.forkpty', 'subprocess.Popen', 'os.remove', 'os.rename',
              'os.unlink', 'os.rmdir', 'os.mkdir', 'shutil.', 'ctypes.', 'socket.', 'os.chmod', 'os.truncate')

def _audit(event, args):
    bad = event.startswith(_FORBIDDEN)
    if event == 'open' and len(args) >= 3:
        mode, flags = args[1], args[2]
        bad = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if event == 'exec' and args and not os.path.isfile(getattr(args[0], 'co_filename', '')):
        bad = True # code that is not a module of a file: source from the loaded file
    if bad:
        os.write(2, f'forbidden: {event} {str(args)[:200]}\n'.encode())
        os._exit(3)

def _run_child(cases, paths, report_fd):
    """In the child: load each case, write one line per case to report_fd: 'i ok', 'i err' or 'i bad <text>'."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open('/proc/self/statm') as f:
        vm = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_HEADROOM, hard))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    out = os.fdopen(report_fd, 'w', buffering=1) # before the audit hook, which refuses files opened for writing
    sys.addaudithook(_audit)
    torch.set_num_threads(1)
    for (i, (kind, _)), path in zip(cases, paths):
        out.write(f'{i} start\n')
        signal.alarm(CASE_SECONDS)
        try:
            _load(kind, path)
            result = 'ok'
        except (ValueError, OSError) as err:
            text = str(err)
            result = 'err' if '\n' not in text and path in text else f'bad {type(err).__name__}: {text[:300]!r}'
        except BaseException as err: # pylint: disable=broad-exception-caught
            result = f'bad {type(err).__name__}: {str(err)[:300]!r}'
        signal.alarm(0)
        out.write(f'{i} {result}\n')
    out.flush()
    os._exit(0)

def _run_batch(batch, workdir):
    """{index: outcome} of a batch run in one forked child; outcomes 'ok', 'err', 'bad ...', 'crash ...', 'hang'."""
    paths = []
    for i, (kind, data) in batch:
        path = os.path.join(workdir, f'case-{i:05d}-{kind}.{"pt" if kind == "state" else "pkl"}')
        with open(path, 'wb') as f:
            f.write(data)
        paths.append(path)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            os.chdir(workdir)
            _run_child(batch, paths, write_fd)
        finally:
            os._exit(4)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        lines = f.read().splitlines()
    _, status = os.waitpid(pid, 0)
    outcomes, started = dict(), None
    for line in lines:
        index, result = line.split(' ', 1)
        if result == 'start':
            started = int(index)
        else:
            outcomes[int(index)] = result
            started = None
    if started is not None:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        outcomes[started] = 'hang' if sig == signal.SIGALRM else f'crash (status {status}, signal {sig})'
    for path in paths:
        os.remove(path)
    return outcomes

#----------------------------------------------------------------------------

def test_fuzzed_files_load_or_fail_in_one_line(tmp_path):
    import fid # imported before forking, as is everything the loaders use
    from training import network_io, training_loop # pylint: disable=unused-import
    cases = list(enumerate(make_cases(2000, SEED)))
    workdir = tmp_path / 'work'
    workdir.mkdir()
    for kind, data in [('network', _network_pickle()), ('state', _training_state()), ('detector', _detector_pickle())]:
        (workdir / 'warmup').write_bytes(data) # warm-up: every lazy import happens here, not in the children
        try:
            _load(kind, str(workdir / 'warmup'))
        except ValueError:
            pass
        os.remove(workdir / 'warmup')
    del fid

    outcomes = dict()
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        result = _run_batch(batch, str(workdir))
        if len(result) < len(batch) or any(r.startswith(('crash', 'hang')) for r in result.values()):
            for case in batch: # replay one by one to tell which case killed the child
                result.update(_run_batch([case], str(workdir)))
        outcomes.update(result)

    failures = {i: r for i, r in outcomes.items() if r not in ('ok', 'err')}
    failures.update({i: 'no result' for i, _ in cases if i not in outcomes})
    counts = {kind: sum(1 for i, (k, _) in cases if k == kind and outcomes.get(i) == 'ok') for kind in ('network', 'state', 'detector', 'script')}
    print(f'fuzz seed {SEED}: {len(cases)} cases, loads that succeeded per kind {counts}')
    assert not failures, f'FUZZ_SEED={SEED}: ' + '; '.join(f'case {i} ({cases[i][1][0]}): {r}' for i, r in sorted(failures.items())[:10])
    assert sorted(os.listdir(workdir)) == [] # nothing written by any case
