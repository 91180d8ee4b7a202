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
    assert sorted(os.listdir(tmp_path)) == [f'{md5}_model.pkl', f'{md5}_model.pkl.sha256']
    assert (tmp_path / f'{md5}_model.pkl.sha256').read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()

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
        child.send_signal(signal.SIGKILL) # part or all of what the server sent is on disk
        child.wait()
    (stale,) = os.listdir(tmp_path)
    assert stale.startswith('..download-') and f'-{child.pid}-' in stale and 0 < os.path.getsize(tmp_path / stale) <= len(PAYLOAD)
    live = stale.replace(f'-{child.pid}-', f'-{os.getpid()}-')
    other_host = '..download-elsewhere-1-' + '0' * 32 + '.tmp-00000000'
    for name in [live, other_host]:
        (tmp_path / name).write_bytes(b'partial')

    with _served() as url:
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == PAYLOAD
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert sorted(os.listdir(tmp_path)) == sorted([f'{md5}_model.pkl', f'{md5}_model.pkl.sha256', live, other_host])


def test_unreachable_host_names_url(tmp_path):
    url = f'http://127.0.0.1:{free_port()}/files/model.pkl' # nothing listens there
    with pytest.raises(IOError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    assert url in str(info.value) and 'cannot be reached: connection refused' in str(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_file_is_not_retried_forever(tmp_path):
    with _served() as url:
        url = url.replace('model.pkl', 'absent.pkl')
        with pytest.raises(IOError, match=r'after 1 attempt: HTTP 404 \(Not Found\)'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False)


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / 'local.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'


#----------------------------------------------------------------------------
# Misbehaving servers: each test is bounded by short timeouts.

class _Scripted(http.server.BaseHTTPRequestHandler):
    """Serves /model.pkl according to `mode`; counts the requests in `hits`."""
    mode = 'ok'
    hits = None
    release = None # an Event that ends a stall or a trickle

    def do_GET(self):
        self.hits.append(self.path)
        if self.mode == 'flaky' and len(self.hits) <= 2:
            self.send_error(503)
            return
        body, content_type = PAYLOAD, 'application/octet-stream'
        if self.mode == 'html':
            body, content_type = b'<!DOCTYPE html><html><body>Please log in</body></html>', 'text/html; charset=utf-8'
        self.send_response(200)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.mode == 'stall': # headers, then nothing
            self.release.wait(30)
            return
        if self.mode == 'trickle': # a byte every 0.2 s: never a read timeout, never the end
            for byte in body:
                if self.release.wait(0.2):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _scripted(mode):
    hits, release = [], threading.Event()
    handler = type('Handler', (_Scripted,), dict(mode=mode, hits=hits, release=release))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}/model.pkl', hits
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_stalled_server_fails_within_seconds(tmp_path):
    with _scripted('stall') as (url, hits):
        start = time.monotonic()
        with pytest.raises(IOError, match='stalled') as info:
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, timeouts=(2, 1), retry_delay=0.1)
        elapsed = time.monotonic() - start
    assert url in str(info.value) and elapsed < 5 and len(hits) == 1 # a stall is not retried
    assert os.listdir(tmp_path) == []


def test_trickling_server_hits_the_deadline(tmp_path):
    with _scripted('trickle') as (url, hits):
        start = time.monotonic()
        with pytest.raises(IOError, match='did not finish in time'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, timeouts=(2, 1), deadline=2, retry_delay=0.1)
        elapsed = time.monotonic() - start
    assert 2 <= elapsed < 5 and len(hits) == 1
    assert os.listdir(tmp_path) == []


def test_server_error_is_retried_with_backoff(tmp_path):
    with _scripted('flaky') as (url, hits):
        start = time.monotonic()
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False, retry_delay=0.2) as f:
            assert f.read() == PAYLOAD
        elapsed = time.monotonic() - start
    assert len(hits) == 3 and elapsed >= 0.2 + 0.4 # two 503s, waits of 0.2 s and 0.4 s


def test_server_error_names_the_status(tmp_path):
    with _scripted('flaky') as (url, hits):
        with pytest.raises(IOError, match=r'after 2 attempts: HTTP 503'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, num_attempts=2, retry_delay=0.05)
    assert len(hits) == 2


def test_html_page_is_refused_and_not_cached(tmp_path):
    with _scripted('html') as (url, hits):
        with pytest.raises(IOError, match='HTML page') as info:
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, retry_delay=0.05)
    assert url in str(info.value) and len(hits) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != 'posix', reason='POSIX permissions')
def test_cache_dir_writable_by_others_is_refused(tmp_path):
    cache = tmp_path / 'cache'
    cache.mkdir()
    os.chmod(cache, 0o777)
    planted = cache / (hashlib.md5(b'http://example.com/model.pkl').hexdigest() + '_model.pkl')
    planted.write_bytes(b'planted')
    with pytest.raises(IOError, match='writable by other users') as info:
        util.open_url('http://example.com/model.pkl', cache_dir=str(cache), verbose=False)
    assert str(cache) in str(info.value)


def test_cache_without_home_is_not_a_shared_folder(monkeypatch):
    for name in ('HOME', 'USERPROFILE', 'DNNLIB_CACHE_DIR'):
        monkeypatch.delenv(name, raising=False)
    import tempfile
    try:
        path = util.make_cache_dir_path('downloads')
    except ValueError as err:
        assert 'DNNLIB_CACHE_DIR' in str(err)
        return
    assert not path.startswith(tempfile.gettempdir())


def test_changed_cache_file_names_the_file(tmp_path):
    with _served() as url:
        path = util.open_url(url, cache_dir=str(tmp_path), verbose=False, return_filename=True)
    with open(path, 'r+b') as f:
        f.write(b'X') # changed after the download (or planted)
    with pytest.raises(IOError, match='delete it') as info:
        util.open_url(url, cache_dir=str(tmp_path), verbose=False)
    assert path in str(info.value)


def test_expected_sha256_is_checked(tmp_path):
    with _served() as url:
        with pytest.raises(IOError, match='SHA-256'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256='0' * 64)
        assert not any(name.endswith('model.pkl') for name in os.listdir(tmp_path))
        good = hashlib.sha256(PAYLOAD).hexdigest()
        assert util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256=good, return_filename=True)


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path):
    # A writer killed on this host (dead PID), one of the old naming long untouched, one of another host long
    # untouched: removed. A live writer of this host, and a recent one of another host: kept.
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = util._host_tag()
    names = dict(
        dead=f'.network-snapshot-000010.pkl.tmp-{host}-{dead.pid}-0123abcd',
        old=f'.training-state-000010.pt.tmp-89abcdef',
        other_old=f'.stats.npz.tmp-elsewhere-1-0123abcd',
        live=f'.data.zip.tmp-{host}-{os.getpid()}-0123abcd',
        other_recent=f'.other.pkl.tmp-elsewhere-1-0123abcd',
    )
    for name in names.values():
        (tmp_path / name).write_bytes(b'partial')
    long_ago = time.time() - util.STALE_TEMP_SECONDS - 60
    for key in ('old', 'other_old'):
        os.utime(tmp_path / names[key], (long_ago, long_ago))
    with util.atomic_write(str(tmp_path / 'network-snapshot-000020.pkl')) as f:
        f.write(b'complete')
    assert sorted(os.listdir(tmp_path)) == sorted(['network-snapshot-000020.pkl', names['live'], names['other_recent']])
