"""dnnlib.util.open_url against a real HTTP server on loopback."""

import gzip as gzlib
import hashlib
import http.server
import os
import threading

import pytest

from dnnlib import util
from conftest import free_port

PAYLOAD = bytes(range(256)) * 4096 # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    truncate = False
    gzip = False

    def do_GET(self):
        if self.path != '/files/model.pkl':
            self.send_error(404)
            return
        body = gzlib.compress(PAYLOAD) if self.gzip else PAYLOAD
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if self.gzip:
            self.send_header('Content-Encoding', 'gzip')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.truncate: # send half the file, then drop the connection
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _serve(truncate=False, gzip=False):
    handler = type('Handler', (_Handler,), dict(truncate=truncate, gzip=gzip))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def test_download_is_cached_and_reused_offline(tmp_path):
    server = _serve()
    url = f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'
    try:
        with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == PAYLOAD
    finally:
        server.shutdown()
        server.server_close()
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert os.listdir(tmp_path) == [f'{md5}_model.pkl']

    # The server is gone: the second call is served from the cache.
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == PAYLOAD
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True) == str(tmp_path / f'{md5}_model.pkl')


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'envcache'))
    server = _serve()
    url = f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'
    try:
        path = util.open_url(url, return_filename=True, verbose=False)
    finally:
        server.shutdown()
        server.server_close()
    assert os.path.dirname(path) == str(tmp_path / 'envcache' / 'downloads')


def test_compressed_transfer_is_stored_decompressed(tmp_path):
    # With Content-Encoding: gzip, Content-Length counts the compressed bytes on the wire.
    server = _serve(gzip=True)
    url = f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'
    try:
        with util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False) as f:
            assert f.read() == PAYLOAD
    finally:
        server.shutdown()
        server.server_close()

@pytest.mark.parametrize('gzip', [False, True])
def test_dropped_connection_leaves_no_cache_entry(tmp_path, gzip):
    server = _serve(truncate=True, gzip=gzip)
    url = f'http://127.0.0.1:{server.server_address[1]}/files/model.pkl'
    try:
        with pytest.raises(IOError, match='127.0.0.1') as info:
            util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    finally:
        server.shutdown()
        server.server_close()
    assert url in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unreachable_host_names_url(tmp_path):
    url = f'http://127.0.0.1:{free_port()}/files/model.pkl' # nothing listens there
    with pytest.raises(IOError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    assert url in str(info.value) and 'cannot be reached' in str(info.value)
    assert os.listdir(tmp_path) == []


def test_missing_file_is_not_retried_forever(tmp_path):
    server = _serve()
    url = f'http://127.0.0.1:{server.server_address[1]}/files/absent.pkl'
    try:
        with pytest.raises(IOError, match='after 1 attempt: 404'):
            util.open_url(url, cache_dir=str(tmp_path), verbose=False)
    finally:
        server.shutdown()
        server.server_close()


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / 'local.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'
