"""dnnlib.util.open_url against a real HTTP server on loopback."""

import contextlib
import gzip as gzlib
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dnnlib import util
from conftest import ROOT, free_port, subprocess_env

PAYLOAD = bytes(range(256)) * 4096 # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    truncate = False
    gzip = False
    stall = None # an Event to wait for before sending the second half

    def do_GET(self):
        if self.path != '/files/model.pkl':
            self.send_error(404)
            return
        body = gzlib.compress(PAYLOAD) if self.gzip else PAYLOAD
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if self.gzip:
            self.send_header('Content-Encoding', 'gzip')
        self.send_header('Content-Length', str(len(body) * (2 if self.stall is not None else 1)))
        self.end_headers()
        if self.stall is not None: # announce twice the file, send it once, and wait
            self.wfile.write(body)
            self.wfile.flush()
            self.stall.wait(60)
            return
        if self.truncate: # send half the file, then drop the connection
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _served(truncate=False, gzip=False, stall=None):
    """A loopback HTTP server for the context; yields the URL of its file."""
    handler = type('Handler', (_Handler,), dict(truncate=truncate, gzip=gzip, stall=stall))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'
    finally:
        if stall is not None:
            stall.set()
        server.shutdown()
        server.server_close()


def test_download_is_cached_and_reused_offline(tmp_path):
    with _served() as url:
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == PAYLOAD
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert os.listdir(tmp_path) == [f'{md5}_model.pkl']

    # The server is gone: the second call is served from the cache.
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == PAYLOAD
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True) == str(tmp_path / f'{md5}_model.pkl')


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'envcache'))
    with _served() as url:
        path = util.open_url(url, return_filename=True, verbose=False)
    assert os.path.dirname(path) == str(tmp_path / 'envcache' / 'downloads')


def test_compressed_transfer_is_stored_decompressed(tmp_path):
    # With Content-Encoding: gzip, Content-Length counts the compressed bytes on the wire.
    with _served(gzip=True) as url:
        with util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False) as f:
            assert f.read() == PAYLOAD


@pytest.mark.parametrize('gzip', [False, True])
def test_dropped_connection_leaves_no_cache_entry(tmp_path, gzip):
    with _served(truncate=True, gzip=gzip) as url:
        with pytest.raises(IOError, match='127.0.0.1') as info:
            util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    assert url in str(info.value)
    assert os.listdir(tmp_path) == []


def test_killed_download_is_removed_by_the_next(tmp_path):
    # A download killed by SIGKILL leaves its temporary file; the next download into the cache removes it,
    # but not those of live processes or of other hosts sharing the folder.
    with _served(stall=threading.Event()) as url:
        code = f'from dnnlib import util; util.open_url({url!r}, cache_dir={str(tmp_path)!r}, verbose=False)'
        child = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=subprocess_env())
        deadline = time.time() + 60
        while not any(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)) and time.time() < deadline:
            assert child.poll() is None
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    (stale,) = os.listdir(tmp_path)
    assert stale.startswith('..download-') and f'-{child.pid}-' in stale and os.path.getsize(tmp_path / stale) == len(PAYLOAD)
    live = stale.replace(f'-{child.pid}-', f'-{os.getpid()}-')
    other_host = '..download-elsewhere-1-' + '0' * 32 + '.tmp-00000000'
    for name in [live, other_host]:
        (tmp_path / name).write_bytes(b'partial')

    with _served() as url:
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == PAYLOAD
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert sorted(os.listdir(tmp_path)) == sorted([f'{md5}_model.pkl', live, other_host])


def test_unreachable_host_names_url(tmp_path):
    url = f'http://127.0.0.1:{free_port()}/files/model.pkl' # nothing listens there
    with pytest.raises(IOError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    assert url in str(info.value) and 'cannot be reached' in str(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_file_is_not_retried_forever(tmp_path):
    with _served() as url:
        url = url.replace('model.pkl', 'absent.pkl')
        with pytest.raises(IOError, match='after 1 attempt: 404'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False)


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / 'local.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'
