"""Regression tests for the hostile-file vectors of safe loading (docs/safe-loading.md):
each crafted file fails in one line naming it, without running code, writing a
file, crashing or hanging, and without --allow-code."""

import hashlib
import http.server
import io
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, free_port, subprocess_env

DEMO_PKL = os.path.join(ROOT, 'demo', 'edm-digits-16x16-cond.pkl')

#----------------------------------------------------------------------------
# Helpers.

class _Reduce:
    """Pickles as func(*args): the way a crafted file calls an allowed global with chosen arguments."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)

def _network_with(tmp_path, name, extra):
    """The demo network pickle with one more entry (a crafted object)."""
    with open(DEMO_PKL, 'rb') as f:
        data = pickle.load(f)
    data['note'] = extra
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data))
    return str(path)

def _one_line_error(fn, path, *words):
    """fn() raises ValueError/OSError: one line, naming `path` and the words."""
    with pytest.raises((ValueError, OSError)) as info:
        fn()
    message = str(info.value)
    assert '\n' not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message

def _load_network(path):
    from training.network_io import load_network_pkl
    return lambda: load_network_pkl(str(path), verbose=False)

def _torchscript_bytes():
    import warnings
    class Scripted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.jit.save(torch.jit.script(Scripted()), f)
    return f.getvalue()

@pytest.fixture(autouse=True)
def _no_hang():
    """A vector that hangs fails the test after 60 s instead of blocking the suite."""
    def fail(*_):
        raise TimeoutError('the load hung')
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)

#----------------------------------------------------------------------------
# No code.

def test_torchscript_is_refused_everywhere(tmp_path):
    import fid
    from training.training_loop import load_state_dump
    script = _torchscript_bytes()
    pkl = _network_with(tmp_path, 'nested.pkl', _Reduce(torch.storage._load_from_bytes, script)) # a TorchScript "storage"
    _one_line_error(_load_network(pkl), pkl, 'TorchScript', '--allow-code')
    state = tmp_path / 'training-state-000000.pt'
    state.write_bytes(script)
    _one_line_error(lambda: load_state_dump(str(state)), state, 'TorchScript')
    detector = tmp_path / 'detector.bin' # told by content, not by name
    detector.write_bytes(script)
    _one_line_error(lambda: fid.load_detector(str(detector), device='cpu', verbose=False), detector, 'TorchScript', '--allow-code')
    assert fid.load_detector(str(detector), device='cpu', verbose=False, allow_code=True)(torch.ones([1])).item() == 2

def test_no_state_on_classes(tmp_path):
    # torch.nn.Linear (the class, not an instance) given the slot state {'forward': None}: BUILD would set it on the class.
    forward = torch.nn.Linear.forward
    raw = b'\x80\x02ctorch.nn.modules.linear\nLinear\nN}X\x07\x00\x00\x00forwardNs\x86b.'
    path = tmp_path / 'build-on-class.pkl'
    path.write_bytes(raw)
    _one_line_error(_load_network(path), path, 'class Linear')
    assert torch.nn.Linear.forward is forward

def test_class_name_of_a_run_folder_is_checked(tmp_path):
    import train
    run = tmp_path / '00000-run'
    run.mkdir()
    marker = tmp_path / 'marker'
    recorded = dict(network_kwargs=dict(class_name='os.system', command=f'touch {marker}'), loss_kwargs=dict(class_name='training.loss.EDMLoss'))
    (run / 'training_options.json').write_text(json.dumps(recorded))
    (run / 'training-state-000000.pt').write_bytes(b'')
    res = CliRunner().invoke(train.main, [f'--resume={run}', '--device=cpu'])
    assert res.exit_code != 0 and not marker.exists()
    line = res.output.strip().splitlines()[-1]
    assert line.startswith('Error: ') and 'training_options.json' in line and "'os.system'" in line

#----------------------------------------------------------------------------
# Crashes of the interpreter: checked in a child process, so that a regression fails this test instead of the suite.

_CRASHERS = dict(
    # numpy.dtype('f8') given a crafted state (elsize and alignment).
    dtype_state=b'\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\x7fK\x10K\x00tb.',
    # {((((...)))): None}, 100000 levels deep: hashing the key recurses in C.
    nested_key=b'\x80\x02}N' + b'\x85' * 100000 + b'Ns.',
    # The same tuple as a set item.
    nested_set=b'\x80\x04\x8f(N' + b'\x85' * 100000 + b'\x90.',
    # A value 100000 lists deep.
    nested_list=b'\x80\x02' + b']' * 100000 + b'a' * 99999 + b'.',
)

def test_crafted_states_and_nesting_fail_in_one_line(tmp_path):
    paths = dict()
    for name, raw in _CRASHERS.items():
        paths[name] = tmp_path / f'{name}.pkl'
        paths[name].write_bytes(raw)
    code = ('import sys\nfrom training.network_io import load_network_pkl\n'
            'for path in sys.argv[1:]:\n'
            '    try:\n        load_network_pkl(path, verbose=False)\n        print("loaded", path)\n'
            '    except ValueError as err:\n        print(str(err).replace("\\n", "<newline>"))\n')
    res = subprocess.run([sys.executable, '-c', code, *map(str, paths.values())], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for (name, path), line in zip(paths.items(), lines):
        assert line.startswith(str(path)) and '<newline>' not in line, (name, line)
    assert 'numpy dtype' in lines[0] and 'nests deeper' in lines[1] and 'nests deeper' in lines[2] and 'deeper' in lines[3]

#----------------------------------------------------------------------------
# Bounded.

def test_huge_declared_sizes_are_refused_before_reading(tmp_path):
    from training.training_loop import load_state_dump
    cases = dict(
        bytes8=b'\x80\x04\x8e' + struct.pack('<Q', 1 << 60) + b'x' * 16,                     # BINBYTES8 of 2^60 bytes
        frame=b'\x80\x04\x95' + struct.pack('<Q', 1 << 40) + b'N.',                          # a frame of 1 TiB
        unicode=b'\x80\x02X' + struct.pack('<I', 0xffffffff) + b'abc',                      # BINUNICODE of 4 GiB
    )
    for name, raw in cases.items():
        path = tmp_path / f'{name}.pkl'
        path.write_bytes(raw)
        _one_line_error(_load_network(path), path, 'bytes')
    # A nested storage that declares 2^40 floats, and a tensor reaching past its storage.
    legacy = io.BytesIO()
    torch.save(torch.zeros(4).untyped_storage(), legacy, _use_new_zipfile_serialization=False)
    huge = legacy.getvalue().replace(b'K\x10N', b'\x8a\x06' + (1 << 40).to_bytes(6, 'little') + b'N', 1) # numel 16 bytes -> 2^40
    assert huge != legacy.getvalue()
    path = _network_with(tmp_path, 'huge-storage.pkl', _Reduce(torch.storage._load_from_bytes, huge))
    _one_line_error(_load_network(path), path, 'declares')
    path = _network_with(tmp_path, 'huge-view.pkl', _Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(4).storage(), 0, (1 << 20, 1 << 20), (1, 1), False, {}))
    _one_line_error(_load_network(path), path, 'reaches past')
    # A training state whose storage record is shorter than declared.
    state = io.BytesIO()
    torch.save(dict(net=torch.nn.Linear(2, 2), optimizer_state={}), state)
    z_in, out = zipfile.ZipFile(io.BytesIO(state.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, 'w') as z_out:
        for info in z_in.infolist():
            z_out.writestr(info.filename, z_in.read(info)[:2] if '/data/' in info.filename else z_in.read(info))
    path = tmp_path / 'training-state-000001.pt'
    path.write_bytes(out.getvalue())
    _one_line_error(lambda: load_state_dump(str(path)), path, 'declares')

def test_fifo_and_big_file_fail_at_once(tmp_path):
    import fid
    from training.training_loop import load_state_dump
    fifo = tmp_path / 'fifo.pkl'
    os.mkfifo(fifo)
    _one_line_error(_load_network(fifo), fifo, 'FIFO')
    _one_line_error(lambda: load_state_dump(str(fifo)), fifo, 'FIFO')
    _one_line_error(lambda: fid.load_detector(str(fifo), device='cpu', verbose=False), fifo, 'FIFO')
    big = tmp_path / 'big.pkl' # 6 GB, sparse: a pickle header that announces a huge frame, then zeros
    with open(big, 'wb') as f:
        f.write(b'\x80\x04\x95' + struct.pack('<Q', 5 << 30))
        f.truncate(6 << 30)
    _one_line_error(_load_network(big), big, 'frame')
    _one_line_error(lambda: load_state_dump(str(big)), big, 'frame')

def test_huge_sampler_idx_and_odd_resume_values(tmp_path):
    from training.training_loop import load_state_dump
    base = dict(net=torch.nn.Linear(2, 2), optimizer_state={}, cur_nimg=1000, cur_tick=1, tick_start_nimg=500, sampler_idx=1000)
    bad = dict(sampler_idx=10**15, cur_tick=-1, tick_start_nimg=2000, cur_nimg=True,
               rng_states=[dict(torch=torch.zeros(7, dtype=torch.uint8), numpy=None, python=None)],
               sampler_state=dict(idx=0, order=np.array([5, 9]), rnd_state=np.random.RandomState(0).get_state()))
    for key, value in bad.items():
        path = tmp_path / f'training-state-{key}.pt'
        torch.save({**base, key: value}, path)
        _one_line_error(lambda: load_state_dump(str(path)), path, key.split('_')[0])

def test_failed_resume_leaves_no_run_folder(tmp_path):
    import train
    from conftest import make_tiny_net # a state whose sampler_idx is beyond its cur_nimg
    images = tmp_path / 'images'
    images.mkdir()
    import PIL.Image
    for i in range(4):
        PIL.Image.fromarray(np.full([8, 8, 3], i * 60, dtype=np.uint8)).save(images / f'{i}.png')
    state = tmp_path / 'old' / 'training-state-000001.pt'
    state.parent.mkdir()
    net = make_tiny_net()
    torch.save(dict(net=net, optimizer_state=torch.optim.Adam(net.parameters()).state_dict(), cur_nimg=1000, sampler_idx=10**15), state)
    outdir = tmp_path / 'runs'
    res = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={images}', f'--resume={state}', '--device=cpu', '--cbase=16',
                                          '--cres=1,2', '--batch=4', '--workers=0'])
    assert res.exit_code != 0 and 'sampler_idx' in res.output.strip().splitlines()[-1]
    assert not outdir.exists() or os.listdir(outdir) == []

#----------------------------------------------------------------------------
# Downloads and the cache.

class _Endless(http.server.BaseHTTPRequestHandler):
    declare = None # a Content-Length to announce, or None

    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if self.declare is not None:
            self.send_header('Content-Length', str(self.declare))
        self.end_headers()
        try:
            while True:
                self.wfile.write(b'\x00' * 65536)
        except OSError:
            pass

    def log_message(self, *args):
        pass

def _serve(handler):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'

@pytest.mark.parametrize('declare', [None, 1 << 40])
def test_endless_body_stops_at_the_cap(tmp_path, declare):
    from dnnlib import util
    server, url = _serve(type('Handler', (_Endless,), dict(declare=declare)))
    try:
        with pytest.raises(IOError) as info:
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, max_bytes=1 << 20)
    finally:
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert '\n' not in message and url in message and str(1 << 20) in message
    assert os.listdir(tmp_path) == [] # no cache entry, no temporary file

def test_planted_cache_file_is_not_the_detector(tmp_path, monkeypatch):
    import fid
    from dnnlib import util
    cache = tmp_path / 'cache'
    (cache / 'downloads').mkdir(parents=True, mode=0o700)
    os.chmod(cache, 0o700)
    marker = tmp_path / 'marker'
    payload = pickle.dumps(_Reduce(exec, f'open({str(marker)!r}, "w").close()'))
    planted = cache / 'downloads' / util._cache_name(fid.DETECTOR_URL, 'inception-2015-12-05.pkl')
    planted.write_bytes(payload)
    (cache / 'downloads' / (planted.name + '.sha256')).write_text(hashlib.sha256(payload).hexdigest() + '\n') # forged digest
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    for name in ('HTTPS_PROXY', 'https_proxy'): # offline: a proxy nobody listens on
        monkeypatch.setenv(name, f'http://127.0.0.1:{free_port()}')
    for name in ('NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(IOError) as info:
        fid.load_detector(device='cpu', verbose=False)
    assert fid.DETECTOR_URL in str(info.value) and not marker.exists()

def test_empty_cache_dir_is_unset(monkeypatch):
    from dnnlib import util
    monkeypatch.setenv('DNNLIB_CACHE_DIR', '')
    monkeypatch.setenv('HOME', '/home/someone')
    assert util.make_cache_dir_path('downloads') == os.path.join('/home/someone', '.cache', 'dnnlib', 'downloads')

#----------------------------------------------------------------------------

class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(1 << 20))
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b'x')
                self.wfile.flush()
                threading.Event().wait(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass

def test_a_trickling_server_fails_the_download(tmp_path, monkeypatch):
    from dnnlib import util
    monkeypatch.setattr(util, 'RATE_WINDOW', 1) # seconds over which min_rate is measured (20 by default)
    server, url = _serve(_Trickle)
    try:
        with pytest.raises(IOError, match='bytes/s'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, min_rate=1000)
    finally:
        server.shutdown()
        server.server_close()
    assert os.listdir(tmp_path) == []

#----------------------------------------------------------------------------

class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503)

    def log_message(self, *args):
        pass

def test_server_errors_stop_retrying_after_the_stall_limit(tmp_path, monkeypatch):
    from dnnlib import util
    monkeypatch.setattr(util, 'STALL_SECONDS', 2) # retries end this long after the last progress (60 by default)
    server, url = _serve(_Failing)
    try:
        with pytest.raises(IOError) as info:
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, num_attempts=10, retry_delay=0.5)
    finally:
        server.shutdown()
        server.server_close()
    attempts = int(re.search(r'after (\d+) attempt', str(info.value)).group(1))
    assert 'HTTP 503' in str(info.value) and attempts < 10 # backoff 0.5, 1, 2, ... s: it gives up before its 10 attempts

#----------------------------------------------------------------------------
