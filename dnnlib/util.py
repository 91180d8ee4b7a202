"""Miscellaneous utility classes and functions: attribute dicts, logging,
construct-by-name, seed lists, atomic file writes and cached downloads."""

import contextlib
import ctypes
import glob
import hashlib
import importlib
import inspect
import io
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import time
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
        self.file_name = file_name
        if file_name is not None:
            self.file = open(file_name, file_mode)
        self.should_flush = should_flush
        self.console_lost = False
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
        self._to_console(self.stdout.write, text)
        if self.file is not None:
            self._to_file(self.file.write, text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        self._to_console(self.stdout.flush)
        if self.file is not None:
            self._to_file(self.file.flush)

    def _to_console(self, op, *args) -> None:
        """op(*args) on the console; a closed one (a pipe whose reader has quit: `train.py | tee log`, then Ctrl-C)
        is dropped, and the log file keeps everything."""
        if self.console_lost:
            return
        try:
            op(*args)
        except (OSError, ValueError): # BrokenPipeError; ValueError: I/O operation on closed file
            self.console_lost = True
            try: # later writes to the console, and the interpreter's flush at exit, go nowhere instead of failing
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                pass

    def _to_file(self, op, *args) -> None:
        """op(*args) on the log file; when it fails (a full disk), stop teeing and raise an OSError naming the file."""
        try:
            op(*args)
        except OSError as err:
            file, self.file = self.file, None # the error message itself still reaches the terminal
            try:
                file.close()
            except OSError:
                pass
            raise OSError(err.errno, err.strerror, self.file_name) from None

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        try:
            self.flush()
        except OSError:
            pass # already reported by the write that failed
        # If using multiple loggers, prevent closing in the wrong order.
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            file, self.file = self.file, None
            file.close()

#----------------------------------------------------------------------------
# Cache directories.

_dnnlib_cache_dir = None

def set_cache_dir(path: str) -> None:
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path

def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache: set_cache_dir(), else $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib (the home
    folder from $HOME, $USERPROFILE or the user database; never a shared temporary folder)."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if os.environ.get('DNNLIB_CACHE_DIR'): # empty counts as unset (not the current folder)
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    for name in ('HOME', 'USERPROFILE'):
        if os.environ.get(name):
            return os.path.join(os.environ[name], '.cache', 'dnnlib', *paths)
    home = os.path.expanduser('~') # the user database when HOME is unset
    if home == '~' or not os.path.isdir(home):
        raise ValueError('no home folder for the download cache: set DNNLIB_CACHE_DIR to a folder of your own')
    return os.path.join(home, '.cache', 'dnnlib', *paths)

def check_private_dir(path: str) -> None:
    """Refuse a folder that another user owns or may write to: a file planted there would be loaded."""
    if os.name != 'posix':
        return
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise IOError(f'the cache folder {path} belongs to another user (uid {st.st_uid}); '
                      f'set DNNLIB_CACHE_DIR to a folder of your own')
    if st.st_mode & 0o022:
        raise IOError(f'the cache folder {path} is writable by other users (mode {st.st_mode & 0o777:o}); '
                      f'run chmod go-w {path}, or set DNNLIB_CACHE_DIR to a folder of your own')

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

STALE_TEMP_SECONDS = 600 # A temporary file of another host (or of the old naming) unmodified this long is stale.

def _host_tag() -> str:
    return re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname())

def _temp_name(path: str) -> str:
    """Hidden name beside `path` that says which host and process writes it: .NAME.tmp-HOST-PID-XXXXXXXX."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}')

def _is_stale_temp(path: str, name: str) -> bool:
    """A temporary file whose process on this host no longer runs, or that nobody has written to for a while."""
    match = re.fullmatch(r'\..+\.tmp-(.+)-(\d+)-[0-9a-f]{8}', name)
    if match and match.group(1) == _host_tag() and not psutil.pid_exists(int(match.group(2))):
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_TEMP_SECONDS
    except OSError:
        return False

def remove_stale_temps(folder: str) -> None:
    """Delete the temporary files (.*.tmp-*) that killed writers left in `folder`; those of writers
    still running (this host: by PID; others: recently modified) stay."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if re.fullmatch(r'\..+\.tmp-.+', name) and _is_stale_temp(path, name):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)

def os_error_behind(err: BaseException) -> Optional[OSError]:
    """`err` if it is an OSError, else the OSError it wraps (torch.save reports a full disk as a RuntimeError of its C++ writer)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

def os_error_message(err: OSError) -> str:
    """One line for an OSError: 'No space left on device: <path>' where it names a file."""
    if err.filename is not None and err.strerror:
        return f'{err.strerror}: {err.filename}'
    return str(err)

@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; rename it to `path` on success, delete it on error.
    Stale temporary files of killed writers in the same folder are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        os_error = os_error_behind(err) if isinstance(err, Exception) else None
        if os_error is not None and os_error.filename in (None, tmp):
            raise OSError(os_error.errno, os_error.strerror, path) from None # e.g. 'No space left on device' naming the file
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

def open_regular(path: str) -> Any:
    """Open a regular file for binary reading; a FIFO, device or folder raises ValueError without blocking (checked
    before the open, and again on the open descriptor, which O_NONBLOCK keeps from waiting for a writer)."""
    check_regular_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_BINARY', 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), 'a special file')
            raise ValueError(f'{path} is {kind}, not a regular file')
        return os.fdopen(fd, 'rb')
    except BaseException:
        os.close(fd)
        raise

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

def file_sha256(path: str) -> str:
    """SHA-256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()

class DownloadError(IOError):
    """A download failed; `retry` says whether another attempt may succeed."""
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry

def _looks_like_html(url: str, content_type: str, head: bytes) -> bool:
    """An HTML page (a login, error or portal page) sent in place of the file asked for."""
    if re.search(r'\.html?$', urllib.parse.urlparse(url).path, re.IGNORECASE):
        return False
    start = head.lstrip()[:15].lower()
    return content_type.lower().startswith('text/html') or start.startswith(b'<!doctype html') or start.startswith(b'<html')

def _describe_request_error(err: Exception, timeouts: Tuple[float, float]) -> DownloadError:
    """What happened, in words, and whether to retry."""
    import requests
    import urllib3
    if isinstance(err, requests.ConnectTimeout):
        return DownloadError(f'no connection within {timeouts[0]:g} s', retry=False)
    if isinstance(err, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)) or 'Read timed out' in str(err):
        return DownloadError(f'the server stalled (no data for {timeouts[1]:g} s)', retry=False)
    if isinstance(err, requests.ConnectionError):
        text = str(err)
        if 'refused' in text.lower():
            return DownloadError('the host cannot be reached: connection refused', retry=False)
        if 'resolve' in text.lower() or 'Name or service not known' in text:
            return DownloadError('the host cannot be reached: its name does not resolve', retry=False)
        return DownloadError(f'the connection failed ({text})', retry=True)
    return DownloadError(str(err), retry=True)

DEFAULT_MAX_DOWNLOAD = 16 << 30  # Bytes a download may have when the server declares no Content-Length (DNNLIB_MAX_DOWNLOAD_GB).
RATE_WINDOW = 20                 # Seconds over which a download must average at least min_rate bytes per second.
STALL_SECONDS = 60               # Retries stop when nothing has arrived at min_rate for this long.

def max_download_bytes(max_bytes: Optional[int] = None) -> int:
    """The size cap of downloads: `max_bytes`, else $DNNLIB_MAX_DOWNLOAD_GB, else DEFAULT_MAX_DOWNLOAD."""
    if max_bytes is not None:
        return int(max_bytes)
    value = os.environ.get('DNNLIB_MAX_DOWNLOAD_GB')
    if not value:
        return DEFAULT_MAX_DOWNLOAD
    try:
        return int(float(value) * (1 << 30))
    except ValueError:
        raise ValueError(f'DNNLIB_MAX_DOWNLOAD_GB={value!r} is not a number of gigabytes') from None

def _fetch(url: str, dest: str, timeouts: Tuple[float, float], deadline: float, verbose: bool, max_bytes: int, min_rate: float,
           progress: List[float]) -> Tuple[str, str]:
    """One attempt: stream `url` into the file `dest` (atomically) until time.monotonic() reaches `deadline`; at most
    the Content-Length (when given) or max_bytes, at min_rate bytes per second or more (progress[0]: the last time
    it was met); return (the server's file name, SHA-256 of the data). Raises DownloadError."""
    import requests
    from tqdm import tqdm

    with requests.get(url, stream=True, timeout=timeouts) as res:
        if res.status_code >= 400:
            retry = res.status_code >= 500 or res.status_code == 429
            raise DownloadError(f'HTTP {res.status_code} ({res.reason})', retry=retry)
        match = re.search(r'filename="([^"]*)"', res.headers.get("Content-Disposition", ""))
        file_name = match[1] if match else (os.path.basename(urllib.parse.urlparse(url).path) or url)
        try:
            total = int(res.headers.get('Content-Length', 0)) or None # bytes on the wire (compressed, if encoded)
        except ValueError:
            total = None
        if total is not None and total > max_bytes:
            raise DownloadError(f'the server declares {total} bytes, more than the limit of {max_bytes} '
                                f'(raise it with DNNLIB_MAX_DOWNLOAD_GB or max_bytes)', retry=False)
        read = getattr(res.raw, 'read1', None) or res.raw.read # read1: return what has arrived, so the deadline is seen
        digest = hashlib.sha256()
        window_start, window_bytes = time.monotonic(), 0
        with atomic_write(dest) as f:
            with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=f'Downloading {file_name}',
                      disable=not verbose, leave=False, file=sys.stderr) as bar:
                while True:
                    now = time.monotonic()
                    if now > deadline:
                        raise DownloadError(f'the download did not finish in time ({res.raw.tell()} bytes received)', retry=False)
                    chunk = read(1 << 16, decode_content=True)
                    if not chunk:
                        break
                    if f.tell() == 0 and _looks_like_html(url, res.headers.get('Content-Type', ''), chunk):
                        raise DownloadError(f'the server sent an HTML page (HTTP {res.status_code}), not the file', retry=False)
                    if res.raw.tell() > (total or max_bytes) or f.tell() + len(chunk) > max_bytes:
                        raise DownloadError(f'the server sends more than the {"declared " if total else ""}{total or max_bytes} bytes'
                                            + ('' if total else ' (raise the limit with DNNLIB_MAX_DOWNLOAD_GB or max_bytes)'), retry=False)
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(res.raw.tell() - bar.n)
                    window_bytes += len(chunk)
                    now = time.monotonic()
                    if now - window_start >= RATE_WINDOW:
                        if window_bytes < min_rate * (now - window_start):
                            raise DownloadError(f'the server sends {window_bytes / (now - window_start):.0f} bytes/s, '
                                                f'less than {min_rate:.0f}', retry=False)
                        window_start, window_bytes, progress[0] = now, 0, now
            received = res.raw.tell()
            if f.tell() == 0:
                raise DownloadError('no data received', retry=True)
            if total is not None and received != total:
                raise DownloadError(f'connection closed after {received} of {total} bytes', retry=True)
    return file_name, digest.hexdigest()

def _download(url: str, dest: str, num_attempts: int, verbose: bool, timeouts: Tuple[float, float], deadline: float,
              retry_delay: float, max_bytes: int, min_rate: float) -> Tuple[str, str]:
    """Stream `url` into the file `dest` with retries (backoff on server errors); return (file name, SHA-256).
    Retries stop once nothing has arrived at min_rate for STALL_SECONDS."""
    import requests
    import urllib3
    end = time.monotonic() + deadline
    progress = [time.monotonic()]
    for attempt in range(num_attempts):
        try:
            return _fetch(url, dest, timeouts, end, verbose, max_bytes, min_rate, progress)
        except DownloadError as err:
            error = err
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
            error = _describe_request_error(err, timeouts)
        if not error.retry or attempt + 1 == num_attempts:
            break
        delay = min(retry_delay * 2 ** attempt, 60.0)
        if time.monotonic() + delay > min(end, progress[0] + STALL_SECONDS):
            break
        if verbose:
            print(f'Retrying {url} in {delay:g} s ({attempt + 1}/{num_attempts - 1}): {error}', file=sys.stderr, flush=True)
        time.sleep(delay)
    attempts = attempt + 1 # the loop may stop early
    raise IOError(f'Could not download {url} after {attempts} attempt{"s" if attempts > 1 else ""}: {error}')

def _download_prefix() -> str:
    """Names of temporary downloads: .download-HOST-PID-UUID (streamed into by _download through
    ..download-HOST-PID-UUID.tmp-HOST-PID-XXXXXXXX)."""
    return '.download-' + _host_tag() + '-'

def _remove_stale_downloads(cache_dir: str) -> None:
    """Delete the temporary files of downloads on this host whose process no longer runs (killed by
    SIGKILL or a power cut); those of other hosts sharing the folder, and of live processes, stay."""
    pattern = r'\.?' + re.escape(_download_prefix()) + r'(\d+)-[0-9a-f]{32}(\.tmp-.+)?'
    for name in os.listdir(cache_dir):
        match = re.fullmatch(pattern, name)
        if match and not psutil.pid_exists(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(cache_dir, name))

def _checked_cache_file(filename: str, sha256: Optional[str]) -> str:
    """Check a cache file against the SHA-256 recorded beside it (FILE.sha256, written when it was fetched;
    recorded now for a file cached by the reference release) and against `sha256` when given."""
    record = filename + '.sha256'
    actual = file_sha256(filename)
    if os.path.isfile(record):
        with open(record, 'rt') as f:
            recorded = f.read().strip()
        if actual != recorded:
            raise IOError(f'the cached download {filename} has changed since it was fetched (SHA-256 {actual}, '
                          f'recorded {recorded}); delete it to download it again')
    else:
        with atomic_write(record, 'wt') as f:
            f.write(actual + '\n')
    if sha256 is not None and actual != sha256.lower():
        raise IOError(f'the cached download {filename} has SHA-256 {actual}, expected {sha256}; delete it to download it again')
    return filename

def open_url(url: str, cache_dir: str = None, num_attempts: int = 10, verbose: bool = True, return_filename: bool = False,
             cache: bool = True, sha256: str = None, timeouts: Tuple[float, float] = (10, 30), deadline: float = 3600,
             retry_delay: float = 1, max_bytes: int = None, min_rate: float = 16384) -> Any:
    """Open a local path, a file:// URL or an http(s) URL (downloaded once into the cache).
    Returns a binary file object, or the local file name with return_filename=True.

    Downloads: `timeouts` (connect, read) in seconds, at most `deadline` seconds in all, server errors
    (5xx, 429) retried after retry_delay, 2 x retry_delay, ... seconds; `sha256`, if given, is the
    expected digest of the file. A cached file is checked against the digest recorded when it was fetched.
    A download stops at its Content-Length, or at max_bytes (max_download_bytes()) when the server declares none,
    and fails when it averages under min_rate bytes per second over RATE_WINDOW seconds."""
    if num_attempts < 1:
        raise ValueError('num_attempts must be at least 1')
    if return_filename and not cache:
        raise ValueError('return_filename requires cache=True')

    # Doesn't look like a URL scheme, so interpret it as a local filename.
    if not re.match('^[a-z]+://', url):
        if return_filename:
            check_regular_file(url)
            return url
        return open_regular(url)

    # Handle file URLs.
    if url.startswith('file://'):
        filename = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        if re.match(r'^/[a-zA-Z]:', filename):
            filename = filename[1:]
        if return_filename:
            check_regular_file(filename)
            return filename
        return open_regular(filename)

    if not is_url(url):
        raise ValueError(f'not a valid URL: {url}')

    # Lookup from cache.
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
    if cache and os.path.isdir(cache_dir):
        check_private_dir(cache_dir)
        cache_files = [name for name in glob.glob(os.path.join(glob.escape(cache_dir), url_md5 + "_*")) if not name.endswith('.sha256')]
        if len(cache_files) == 1:
            filename = _checked_cache_file(cache_files[0], sha256)
            return filename if return_filename else open(filename, "rb")

    # Download into a temporary file in the cache folder, then rename into place.
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    check_private_dir(cache_dir)
    _remove_stale_downloads(cache_dir)
    download_file = os.path.join(cache_dir, f'{_download_prefix()}{os.getpid()}-{uuid.uuid4().hex}')
    try:
        file_name, digest = _download(url, download_file, num_attempts=num_attempts, verbose=verbose, timeouts=timeouts,
                                      deadline=deadline, retry_delay=retry_delay, max_bytes=max_download_bytes(max_bytes),
                                      min_rate=min_rate)
        if sha256 is not None and digest != sha256.lower():
            raise IOError(f'Downloaded {url}, but its SHA-256 is {digest}, not the expected {sha256}')
        if not cache:
            f = open(download_file, "rb")
            os.remove(download_file) # the open handle keeps the data readable
            return f
        cache_file = os.path.join(cache_dir, _cache_name(url, file_name))
        with atomic_write(cache_file + '.sha256', 'wt') as f:
            f.write(digest + '\n')
        os.replace(download_file, cache_file)
    finally:
        if os.path.exists(download_file) and cache:
            os.remove(download_file)
    return cache_file if return_filename else open(cache_file, "rb")
