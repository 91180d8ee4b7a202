"""Miscellaneous utility classes and functions: attribute dicts, logging,
construct-by-name, seed lists, atomic file writes and cached downloads."""

import contextlib
import ctypes
import glob
import hashlib
import importlib
import inspect
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import tempfile
import types
import urllib.parse
import uuid

from typing import Any, List, Optional, Tuple, Union

import psutil

#----------------------------------------------------------------------------
# Attribute dict.

class EasyDict(dict):
    """Dict whose items can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

#----------------------------------------------------------------------------
# Logging.

class Logger(object):
    """Tees stdout and stderr into a file (and keeps printing them)."""

    def __init__(self, file_name: Optional[str] = None, file_mode: str = "w", should_flush: bool = True):
        self.file = None
        if file_name is not None:
            self.file = open(file_name, file_mode)
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.close()

    def write(self, text: Union[str, bytes]) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0: # workaround for a bug in VSCode debugger: sys.stdout.write(''); sys.stdout.flush() => crash
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        # If using multiple loggers, prevent closing in the wrong order.
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------
# Cache directories.

_dnnlib_cache_dir = None

def set_cache_dir(path: str) -> None:
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path

def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------
# Small helpers.

def format_time(seconds: Union[int, float]) -> str:
    """Human-readable duration: '5s', '3m 04s', '2h 03m 04s', '1d 02h 03m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 60 * 60:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 24 * 60 * 60:
        return f"{s // (60 * 60)}h {(s // 60) % 60:02d}m {s % 60:02d}s"
    return f"{s // (24 * 60 * 60)}d {(s // (60 * 60)) % 24:02d}h {(s // 60) % 60:02d}m"

def ask_yes_no(question: str) -> bool:
    while True:
        try:
            print(f"{question} [y/n]")
            return strtobool(input())
        except ValueError:
            pass

def strtobool(value: Union[str, bool]) -> bool:
    """'1', 'true', 'yes', 'on' -> True; '0', 'false', 'no', 'off' -> False (replaces distutils)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ('1', 'true', 't', 'yes', 'y', 'on'):
        return True
    if v in ('0', 'false', 'f', 'no', 'n', 'off'):
        return False
    raise ValueError(f'invalid truth value {value!r}')

def tuple_product(t: Tuple) -> Any:
    result = 1
    for v in t:
        result *= v
    return result

_str_to_ctype = {
    "uint8": ctypes.c_ubyte, "uint16": ctypes.c_uint16, "uint32": ctypes.c_uint32, "uint64": ctypes.c_uint64,
    "int8": ctypes.c_byte, "int16": ctypes.c_int16, "int32": ctypes.c_int32, "int64": ctypes.c_int64,
    "float32": ctypes.c_float, "float64": ctypes.c_double,
}

def get_dtype_and_ctype(type_obj: Any) -> Tuple[Any, Any]:
    import numpy as np
    type_str = np.dtype(type_obj).name
    if type_str not in _str_to_ctype:
        raise ValueError(f'unsupported dtype {type_str}')
    return np.dtype(type_str), _str_to_ctype[type_str]

def parse_int_list(s: Union[str, List[int]], max_len: Optional[int] = None) -> List[int]:
    """Parse '1,2,5-10' into [1, 2, 5, 6, 7, 8, 9, 10]; ranges are inclusive.
    With max_len, a longer list is an error, raised before it is built."""
    if isinstance(s, list):
        return s
    ranges = []
    range_re = re.compile(r'^\s*(-?\d+)\s*-\s*(-?\d+)\s*$')
    for p in str(s).split(','):
        if p.strip() == '':
            continue
        m = range_re.match(p)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f'invalid range {p.strip()!r}: the end is smaller than the start')
            if max_len is not None and len(ranges) + (b - a + 1) > max_len:
                raise ValueError(f'more than {max_len} numbers (at {p.strip()!r})')
            ranges.extend(range(a, b + 1))
        else:
            try:
                ranges.append(int(p))
            except ValueError:
                raise ValueError(f'invalid integer or range {p.strip()!r} in {s!r}') from None
            if max_len is not None and len(ranges) > max_len:
                raise ValueError(f'more than {max_len} numbers (at {p.strip()!r})')
    if len(ranges) == 0:
        raise ValueError(f'empty list {s!r}')
    return ranges

#----------------------------------------------------------------------------
# What unpickling a damaged or foreign file raises (besides OSError).

# Persistent pickles also run the source code they carry, and torch storages look up their keys.
UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError, ValueError,
                     UnicodeDecodeError, SyntaxError, NameError, AssertionError)

#----------------------------------------------------------------------------
# Atomic file writes: never leave a truncated file behind.

def _temp_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.tmp-{uuid.uuid4().hex[:8]}')

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; rename it to `path` on success, delete it on error."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise

@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb'):
    """Open a temporary file beside `path` for writing; it becomes `path` only when closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

#----------------------------------------------------------------------------
# Input files: only regular files are read (a FIFO blocks, a device never ends).

_FILE_KINDS = [(stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO'), (stat.S_ISCHR, 'a character device'),
               (stat.S_ISBLK, 'a block device'), (stat.S_ISSOCK, 'a socket')]

def check_regular_file(path: str) -> None:
    """Raise FileNotFoundError if `path` does not exist, ValueError if it (or the target of a link) is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f'file not found: {path}') from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), 'a special file')
        raise ValueError(f'{path} is {kind}, not a regular file')

#----------------------------------------------------------------------------
# Functionality to import modules/objects by name, and call functions by name.

def get_module_from_obj_name(obj_name: str) -> Tuple[types.ModuleType, str]:
    """Find the module that holds a dotted object name; return (module, name within it)."""

    # allow convenience shorthands, substitute them by full names
    obj_name = re.sub("^np.", "numpy.", obj_name)
    obj_name = re.sub("^tf.", "tensorflow.", obj_name)

    # list alternatives for (module_name, local_obj_name)
    parts = obj_name.split(".")
    name_pairs = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts), 0, -1)]

    # try each alternative in turn
    for module_name, local_obj_name in name_pairs:
        try:
            module = importlib.import_module(module_name)
            get_obj_from_module(module, local_obj_name)
            return module, local_obj_name
        except Exception:
            pass

    # maybe some of the modules themselves contain errors?
    for module_name, _local_obj_name in name_pairs:
        try:
            importlib.import_module(module_name)
        except ImportError:
            if not str(sys.exc_info()[1]).startswith("No module named '" + module_name + "'"):
                raise

    # maybe the requested attribute is missing?
    for module_name, local_obj_name in name_pairs:
        try:
            module = importlib.import_module(module_name)
            get_obj_from_module(module, local_obj_name)
        except ImportError:
            pass

    raise ImportError(f'cannot find {obj_name!r}')

def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    if obj_name == '':
        return module
    obj = module
    for part in obj_name.split("."):
        obj = getattr(obj, part)
    return obj

def get_obj_by_name(name: str) -> Any:
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)

def call_func_by_name(*args, func_name: str = None, **kwargs) -> Any:
    if func_name is None:
        raise ValueError('func_name is required')
    func_obj = get_obj_by_name(func_name)
    if not callable(func_obj):
        raise TypeError(f'{func_name} is not callable')
    return func_obj(*args, **kwargs)

def construct_class_by_name(*args, class_name: str = None, **kwargs) -> Any:
    return call_func_by_name(*args, func_name=class_name, **kwargs)

def get_module_dir_by_obj_name(obj_name: str) -> str:
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect.getfile(module))

def is_top_level_function(obj: Any) -> bool:
    return callable(obj) and obj.__name__ in sys.modules[obj.__module__].__dict__

def get_top_level_function_name(obj: Any) -> str:
    if not is_top_level_function(obj):
        raise ValueError(f'{obj!r} is not a top-level function')
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + "." + obj.__name__

#----------------------------------------------------------------------------
# File system helpers.

def list_dir_recursively_with_ignore(dir_path: str, ignores: List[str] = None, add_base_to_relative: bool = False) -> List[Tuple[str, str]]:
    import fnmatch
    if not os.path.isdir(dir_path):
        raise NotADirectoryError(dir_path)
    base_name = os.path.basename(os.path.normpath(dir_path))
    ignores = ignores or []
    result = []
    for root, dirs, files in os.walk(dir_path, topdown=True):
        for ignore_ in ignores:
            dirs[:] = [d for d in dirs if not fnmatch.fnmatch(d, ignore_)]
            files = [f for f in files if not fnmatch.fnmatch(f, ignore_)]
        absolute_paths = [os.path.join(root, f) for f in files]
        relative_paths = [os.path.relpath(p, dir_path) for p in absolute_paths]
        if add_base_to_relative:
            relative_paths = [os.path.join(base_name, p) for p in relative_paths]
        result += zip(absolute_paths, relative_paths)
    return result

def copy_files_and_create_dirs(files: List[Tuple[str, str]]) -> None:
    for src, dst in files:
        os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
        shutil.copyfile(src, dst)

#----------------------------------------------------------------------------
# URL helpers.

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True if `obj` is a string that looks like an http(s) (or, optionally, file) URL."""
    if not isinstance(obj, str) or not "://" in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
        if not res.scheme or not res.netloc or not "." in res.netloc:
            if not res.netloc.split(':')[0] in ('localhost',):
                return False
        res = urllib.parse.urlparse(urllib.parse.urljoin(obj, "/"))
        if not res.scheme or not res.netloc:
            return False
    except ValueError:
        return False
    return True

def _cache_name(url: str, file_name: str) -> str:
    # Same layout as the reference release, so an existing cache is reused as is.
    url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
    safe_name = re.sub(r"[^0-9a-zA-Z-._]", "_", file_name)[:128]
    return url_md5 + "_" + safe_name

def _download(url: str, dest: str, num_attempts: int, verbose: bool) -> str:
    """Stream `url` into the file `dest` (atomically); return the server's file name."""
    import requests
    from tqdm import tqdm

    last_error = None
    for attempt in range(num_attempts):
        try:
            with requests.get(url, stream=True, timeout=(10, 60)) as res:
                res.raise_for_status()
                match = re.search(r'filename="([^"]*)"', res.headers.get("Content-Disposition", ""))
                file_name = match[1] if match else (os.path.basename(urllib.parse.urlparse(url).path) or url)
                total = int(res.headers.get('Content-Length', 0)) or None # bytes on the wire (compressed, if encoded)
                with atomic_write(dest) as f:
                    with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'Downloading {file_name}',
                              disable=not verbose, leave=False, file=sys.stderr) as bar:
                        for chunk in res.iter_content(chunk_size=1 << 20):
                            f.write(chunk)
                            bar.update(res.raw.tell() - bar.n)
                    received = res.raw.tell()
                    if f.tell() == 0:
                        raise IOError('no data received')
                    if total is not None and received != total:
                        raise IOError(f'connection closed after {received} of {total} bytes')
                return file_name
        except requests.HTTPError as err:
            last_error = err
            if err.response is not None and 400 <= err.response.status_code < 500 and err.response.status_code != 429:
                break # a missing file does not appear by retrying
        except requests.ConnectionError as err:
            last_error = err
            if attempt >= 2:
                break # the host cannot be reached (offline?): a few tries are enough
        except (requests.RequestException, IOError) as err:
            last_error = err
        if verbose and attempt + 1 < num_attempts and not isinstance(last_error, requests.ConnectionError):
            print(f'Retrying {url} ({attempt + 1}/{num_attempts - 1}): {last_error}', file=sys.stderr, flush=True)
    if isinstance(last_error, requests.ConnectionError):
        raise IOError(f'Could not download {url}: the host cannot be reached (offline?): {last_error}')
    attempts = attempt + 1 # the loop may stop early
    raise IOError(f'Could not download {url} after {attempts} attempt{"s" if attempts > 1 else ""}: {last_error}')

def _download_prefix() -> str:
    """Names of temporary downloads: .download-HOST-PID-UUID (streamed into by _download through
    ..download-HOST-PID-UUID.tmp-XXXXXXXX)."""
    return '.download-' + re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname()) + '-'

def _remove_stale_downloads(cache_dir: str) -> None:
    """Delete the temporary files of downloads on this host whose process no longer runs (killed by
    SIGKILL or a power cut); those of other hosts sharing the folder, and of live processes, stay."""
    pattern = r'\.?' + re.escape(_download_prefix()) + r'(\d+)-[0-9a-f]{32}(\.tmp-[0-9a-f]{8})?'
    for name in os.listdir(cache_dir):
        match = re.fullmatch(pattern, name)
        if match and not psutil.pid_exists(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(cache_dir, name))

def open_url(url: str, cache_dir: str = None, num_attempts: int = 10, verbose: bool = True, return_filename: bool = False, cache: bool = True) -> Any:
    """Open a local path, a file:// URL or an http(s) URL (downloaded once into the cache).
    Returns a binary file object, or the local file name with return_filename=True."""
    if num_attempts < 1:
        raise ValueError('num_attempts must be at least 1')
    if return_filename and not cache:
        raise ValueError('return_filename requires cache=True')

    # Doesn't look like a URL scheme, so interpret it as a local filename.
    if not re.match('^[a-z]+://', url):
        return url if return_filename else open(url, "rb")

    # Handle file URLs.
    if url.startswith('file://'):
        filename = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        if re.match(r'^/[a-zA-Z]:', filename):
            filename = filename[1:]
        return filename if return_filename else open(filename, "rb")

    if not is_url(url):
        raise ValueError(f'not a valid URL: {url}')

    # Lookup from cache.
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
    if cache:
        cache_files = glob.glob(os.path.join(glob.escape(cache_dir), url_md5 + "_*"))
        if len(cache_files) == 1:
            filename = cache_files[0]
            return filename if return_filename else open(filename, "rb")

    # Download into a temporary file in the cache folder, then rename into place.
    os.makedirs(cache_dir, exist_ok=True)
    _remove_stale_downloads(cache_dir)
    download_file = os.path.join(cache_dir, f'{_download_prefix()}{os.getpid()}-{uuid.uuid4().hex}')
    try:
        file_name = _download(url, download_file, num_attempts=num_attempts, verbose=verbose)
        if not cache:
            f = open(download_file, "rb")
            os.remove(download_file) # the open handle keeps the data readable
            return f
        cache_file = os.path.join(cache_dir, _cache_name(url, file_name))
        os.replace(download_file, cache_file)
    finally:
        if os.path.exists(download_file) and cache:
            os.remove(download_file)
    return cache_file if return_filename else open(cache_file, "rb")
