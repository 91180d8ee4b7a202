"""Unpickling files that may be hostile: a restricted unpickler that calls only
a table of checked constructors (tensors, arrays, containers, this project's
persistent classes), and readers of torch.save's two formats that never hand
the file to torch.load. Sizes are checked against the file before anything is
allocated, nesting is capped before anything is hashed, and nothing the file
contains runs as code."""

import collections
import io
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile

#----------------------------------------------------------------------------

MAX_DEPTH       = 100       # Nesting of containers (and of tuple keys before they are hashed).
MAX_KEY_NODES   = 10000     # Tuples visited in one dict key or set item (tuple DAGs hash in exponential time).
MAX_LINE        = 1 << 16   # Longest line of a text opcode (protocol 0).
MAX_FRAME       = 1 << 22   # Longest frame (protocol 4): pickle writes frames of about 64 KiB, large data outside them.

# numpy dtypes that arrays and scalars may have: plain numbers (no objects, records, strings).
PLAIN_DTYPES = ('b1', 'i1', 'u1', 'i2', 'u2', 'i4', 'u4', 'i8', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16')

class CodeNotAllowedError(pickle.UnpicklingError):
    """A pickle names code that safe loading does not run (a class or function outside the allow-list)."""

class UnsafeDataError(pickle.UnpicklingError):
    """A pickle holds data that safe loading refuses: sizes beyond the file, deep nesting, odd states."""

#----------------------------------------------------------------------------
# Bounded input: no read asks for more than the file still holds.

class BoundedReader:
    """A binary file object whose reads are checked against the bytes left before any buffer is allocated."""

    def __init__(self, file, name):
        self.file, self.name = file, name
        self.size = _file_size(file)

    def left(self):
        return self.size - self.file.tell()

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.left()
        if n > self.left():
            raise UnsafeDataError(f'it declares {n} bytes where {max(self.left(), 0)} remain')
        return self.file.read(n)

    def readinto(self, buf):
        if len(buf) > self.left():
            raise UnsafeDataError(f'it declares {len(buf)} bytes where {max(self.left(), 0)} remain')
        return self.file.readinto(buf)

    def readline(self):
        line = self.file.readline(MAX_LINE)
        if len(line) == MAX_LINE and not line.endswith(b'\n'):
            raise UnsafeDataError(f'a text opcode is longer than {MAX_LINE} bytes')
        return line

def _file_size(file):
    if isinstance(file, io.BytesIO):
        return file.getbuffer().nbytes
    try:
        return os.fstat(file.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pos = file.tell()
        size = file.seek(0, os.SEEK_END)
        file.seek(pos)
        return size

#----------------------------------------------------------------------------
# Checks on values before they are used.

def _int(value, what, low=0, high=1 << 62):
    if type(value) is not int or not low <= value <= high: # pylint: disable=unidiomatic-typecheck
        raise UnsafeDataError(f'{what} is {_short(value)}, not an integer in [{low}, {high}]')
    return value

def _ints(values, what):
    if not isinstance(values, (tuple, list)) or len(values) > 64:
        raise UnsafeDataError(f'{what} is {_short(values)}, not a short list of integers')
    return tuple(_int(v, what) for v in values)

def _short(value):
    try:
        text = repr(value) if isinstance(value, (int, float, str, bytes, type(None))) else type(value).__name__
    except ValueError: # an integer of more digits than Python converts
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + '...'

def _empty(value, what):
    if value is not None and (not isinstance(value, dict) or len(value) != 0):
        raise UnsafeDataError(f'{what} must be empty, not {_short(value)}')

def check_key(key):
    """A dict key or set item: tuples nested at most MAX_DEPTH deep and MAX_KEY_NODES large, checked
    without recursion before Python hashes them (hashing recurses in C)."""
    if type(key) not in (tuple, frozenset): # pylint: disable=unidiomatic-typecheck
        return key
    stack, nodes = [(key, 1)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_KEY_NODES:
            raise UnsafeDataError(f'a dict key or set item nests deeper than {MAX_DEPTH} levels or holds over {MAX_KEY_NODES} tuples')
        stack.extend((x, depth + 1) for x in item if type(x) in (tuple, frozenset)) # pylint: disable=unidiomatic-typecheck
    return key

def check_depth(obj):
    """Refuse containers (and module states) nested deeper than MAX_DEPTH, or containing themselves."""
    import torch
    height, active = dict(), set()
    stack = [(obj, False)]
    while stack:
        node, done = stack.pop()
        if isinstance(node, torch.nn.Module):
            children = list(vars(node).values())
        elif isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            children = list(node)
        else:
            continue
        key = id(node)
        if done:
            active.discard(key)
            height[key] = 1 + max((height.get(id(c), 0) for c in children), default=0)
            if height[key] > MAX_DEPTH:
                raise UnsafeDataError(f'it nests containers deeper than {MAX_DEPTH} levels')
            continue
        if key in height:
            continue
        if key in active:
            raise UnsafeDataError('it holds a container that contains itself')
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in height)
    return obj

#----------------------------------------------------------------------------
# numpy: plain numeric dtypes, arrays and scalars of them.

def _plain_dtype(dtype, what='a numpy dtype'):
    import numpy as np
    if not isinstance(dtype, np.dtype) or dtype.byteorder not in '=<>|' or dtype.str[1:] not in PLAIN_DTYPES or dtype.names or dtype.shape:
        raise UnsafeDataError(f'{what} is {_short(dtype)}, not one of the plain numeric types {", ".join(PLAIN_DTYPES)}')
    return dtype

def _np_dtype(name, align=False, copy=True):
    import numpy as np
    if not isinstance(name, str) or name not in PLAIN_DTYPES or align not in (False, 0) or copy not in (True, 1):
        raise UnsafeDataError(f'numpy.dtype{_short((name, align, copy))} is not one of the plain numeric types {", ".join(PLAIN_DTYPES)}')
    return np.dtype(name)

def _np_dtype_class(cls):
    """numpy.dtypes.Float32DType and the like: called with no arguments, a plain numeric dtype."""
    def make():
        import numpy as np
        return _plain_dtype(np.dtype(cls()))
    return make

def _np_reconstruct(subtype, shape, typecode):
    import numpy as np
    if subtype is not np.ndarray or shape != (0,) or typecode not in (b'b', 'b'):
        raise UnsafeDataError('an array is rebuilt from something other than a plain numpy.ndarray')
    return np.ndarray((0,), np.int8)

def _np_scalar(dtype, data):
    import numpy as np
    _plain_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafeDataError(f'a numpy scalar of {dtype} holds {_short(data)}')
    return np.frombuffer(data, dtype=dtype)[0]

def _build_ndarray(array, state):
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
        raise UnsafeDataError('an array has a state other than (1, shape, dtype, is_fortran, data)')
    _, shape, dtype, is_fortran, data = state
    shape = _ints(shape, 'an array shape')
    _plain_dtype(dtype, 'the dtype of an array')
    if is_fortran not in (True, False) or not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dtype.itemsize:
        raise UnsafeDataError(f'an array of shape {shape} and {dtype} holds {_short(data)} ({len(data) if isinstance(data, bytes) else "no"} bytes)')
    array.__setstate__(state)

def _build_dtype(dtype, state):
    canonical = dtype.__reduce__()[2]
    if not isinstance(state, tuple) or len(state) != len(canonical) or state[2:] != canonical[2:] or state[0] != canonical[0] \
            or state[1] not in ('<', '>', '|', '='):
        raise UnsafeDataError(f'the numpy dtype {dtype} has the state {_short(state)}')
    dtype.__setstate__(state)

#----------------------------------------------------------------------------
# torch: tensors on storages read by the readers below, never by torch.load.

def _storage_bytes(storage):
    import torch
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafeDataError(f'a tensor is rebuilt on {_short(storage)}, not on a storage of the file')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore') # TypedStorage is deprecated
        return storage.nbytes(), storage.element_size(), storage.dtype

def _rebuild_tensor(storage, offset, size, stride, dtype=None):
    """A tensor viewing `storage`: its extent (computed without overflow) must lie within the storage. A dtype other
    than the storage's (_rebuild_tensor_v3) is taken only on untyped (byte) storages."""
    import torch
    nbytes, _, storage_dtype = _storage_bytes(storage)
    dtype = storage_dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or (dtype != storage_dtype and storage_dtype != torch.uint8):
        raise UnsafeDataError(f'a tensor of {_short(dtype)} is rebuilt on a storage of {storage_dtype}')
    element_size = dtype.itemsize
    offset, size, stride = _int(offset, 'a storage offset'), _ints(size, 'a tensor size'), _ints(stride, 'a tensor stride')
    if len(size) != len(stride):
        raise UnsafeDataError(f'a tensor has size {size} and stride {stride}')
    numel = math.prod(size)
    extent = 0 if numel == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent * element_size > nbytes or numel > max(nbytes // element_size, 1) * (1 << 20):
        raise UnsafeDataError(f'a tensor of size {list(size)[:8]} and stride {list(stride)[:8]} at offset {offset} '
                              f'reaches past its storage of {nbytes // element_size} elements')
    t = torch.empty((0,), dtype=dtype)
    return t.set_(storage._untyped_storage, offset, size, stride) # pylint: disable=protected-access

def _tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _empty(backward_hooks, 'the backward hooks of a tensor')
    _empty(metadata, 'the metadata of a tensor')
    return _rebuild_tensor(storage, offset, size, stride).requires_grad_(bool(requires_grad))

def _tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _empty(backward_hooks, 'the backward hooks of a tensor')
    _empty(metadata, 'the metadata of a tensor')
    return _rebuild_tensor(storage, offset, size, stride, dtype).requires_grad_(bool(requires_grad))

def _parameter(data, requires_grad, backward_hooks, state=None):
    import torch
    _empty(backward_hooks, 'the backward hooks of a parameter')
    _empty(state, 'the state of a parameter')
    if type(data) is not torch.Tensor: # pylint: disable=unidiomatic-typecheck
        raise UnsafeDataError(f'a parameter wraps {_short(data)}, not a tensor')
    return torch.nn.Parameter(data, bool(requires_grad))

def _parameter_new(data=None, requires_grad=True):
    import torch
    if data is None:
        return torch.nn.Parameter(torch.empty(0), bool(requires_grad))
    return _parameter(data, requires_grad, None)

def _tensor_from_numpy(data, dtype, device, requires_grad):
    import numpy as np
    import torch
    if type(data) is not np.ndarray or not isinstance(dtype, torch.dtype): # pylint: disable=unidiomatic-typecheck
        raise UnsafeDataError('a tensor is rebuilt from something other than a numpy array')
    _plain_dtype(data.dtype)
    return torch.from_numpy(data).to(dtype).requires_grad_(bool(requires_grad))

def _meta_tensor(dtype, size, stride, requires_grad):
    import torch
    if not isinstance(dtype, torch.dtype):
        raise UnsafeDataError(f'a meta tensor has the dtype {_short(dtype)}')
    return torch.empty_strided(_ints(size, 'a tensor size'), _ints(stride, 'a tensor stride'), dtype=dtype, device='meta',
                               requires_grad=bool(requires_grad))

def _from_type_v2(func, new_type, args, state):
    import torch
    if func not in (_tensor_v2, _tensor_v3, _rebuild_tensor, _parameter, _tensor_from_numpy, _meta_tensor) \
            or new_type not in (torch.Tensor, torch.nn.Parameter) or not isinstance(args, tuple):
        raise UnsafeDataError('a tensor subclass is rebuilt by something other than torch\'s tensor rebuild functions')
    _empty(state, 'the state of a tensor')
    result = func(*args)
    return result if type(result) is new_type else _parameter(result, result.requires_grad, None) # pylint: disable=unidiomatic-typecheck

def _device(kind, index=None):
    import torch
    if not isinstance(kind, str) or not re.fullmatch(r'[a-z]+(:\d+)?', kind) or index is not None and type(index) is not int: # pylint: disable=unidiomatic-typecheck
        raise UnsafeDataError(f'a torch.device of {_short(kind)}')
    return torch.device(kind) if index is None else torch.device(kind, index)

def _size(dims=()):
    import torch
    return torch.Size(_ints(dims, 'a torch.Size'))

#----------------------------------------------------------------------------
# Containers and builtins.

def _pairs(arg):
    items = list(arg.items()) if isinstance(arg, dict) else list(arg)
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UnsafeDataError('a dict is built from something other than key-value pairs')
        check_key(item[0])
    return items

def _mapping(cls):
    def make(arg=()):
        return cls(_pairs(arg))
    return make

def _items(cls):
    def make(arg=()):
        return cls(check_key(x) for x in list(arg))
    return make

def _bytearray(data=b'', encoding=None):
    if isinstance(data, str) and encoding in ('latin-1', 'latin1'):
        return bytearray(data, 'latin-1')
    if not isinstance(data, (bytes, bytearray)) or encoding is not None:
        raise UnsafeDataError(f'bytearray of {_short(data)}')
    return bytearray(data)

def _encode(text, encoding='utf-8'):
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise UnsafeDataError(f'_codecs.encode with {_short(encoding)}')
    return text.encode(encoding)

def _numbers(cls, count):
    def make(*args):
        if len(args) > count or any(type(a) not in (int, float, type(None)) for a in args): # pylint: disable=unidiomatic-typecheck
            raise UnsafeDataError(f'{cls.__name__} of {_short(args)}')
        return cls(*args)
    return make

def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0 and 1 objects): an allowed class, made without calling it."""
    if base is not object or state is not None or not _instantiable(cls):
        raise CodeNotAllowedError(f'it rebuilds {_short(cls)} on {_short(base)}, which safe loading does not allow')
    return object.__new__(cls)

#----------------------------------------------------------------------------
# The allow-list: (module, name) in a pickle -> what it resolves to. Callables are the checked versions.

def _callables():
    import torch
    from torch_utils import persistence
    import dnnlib
    table = {
        ('builtins', 'set'):                                _items(set),
        ('builtins', 'frozenset'):                          _items(frozenset),
        ('builtins', 'slice'):                              _numbers(slice, 3),
        ('builtins', 'complex'):                            _numbers(complex, 2),
        ('builtins', 'range'):                              _numbers(range, 3),
        ('builtins', 'bytearray'):                          _bytearray,
        ('collections', 'OrderedDict'):                     _mapping(collections.OrderedDict),
        ('copyreg', '_reconstructor'):                      _reconstructor,
        ('_codecs', 'encode'):                              _encode,
        ('dnnlib.util', 'EasyDict'):                        _mapping(dnnlib.EasyDict),
        ('torch', 'device'):                                _device,
        ('torch', 'Size'):                                  _size,
        ('torch._utils', '_rebuild_tensor'):                _rebuild_tensor,
        ('torch._utils', '_rebuild_tensor_v2'):             _tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'):             _tensor_v3,
        ('torch._utils', '_rebuild_parameter'):             _parameter,
        ('torch._utils', '_rebuild_parameter_with_state'):  _parameter,
        ('torch._utils', '_rebuild_device_tensor_from_numpy'): _tensor_from_numpy,
        ('torch._utils', '_rebuild_meta_tensor_no_storage'):   _meta_tensor,
        ('torch._tensor', '_rebuild_from_type_v2'):         _from_type_v2,
        ('torch.nn.parameter', 'Parameter'):                _parameter_new,
        ('torch.storage', '_load_from_bytes'):              load_nested_storage,
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): persistence.reconstruct_safe_obj,
        ('numpy', 'dtype'):                                 _np_dtype,
        ('numpy.core.multiarray', '_reconstruct'):          _np_reconstruct,
        ('numpy._core.multiarray', '_reconstruct'):         _np_reconstruct,
        ('numpy.core.multiarray', 'scalar'):                _np_scalar,
        ('numpy._core.multiarray', 'scalar'):               _np_scalar,
    }
    table[('torch', 'Tensor')] = torch.Tensor # only as the type argument of _rebuild_from_type_v2
    return table

_table = None

def _resolve(module, name):
    """What (module, name) in a pickle stands for, or CodeNotAllowedError."""
    global _table # pylint: disable=global-statement
    if _table is None:
        _table = _callables()
    found = _table.get((module, name))
    if found is not None:
        return found
    value = _plain_type(module, name)
    if value is not None:
        return value
    raise CodeNotAllowedError(f'it refers to {module}.{name}, which safe loading does not allow')

def _plain_type(module, name):
    """torch dtypes and storage classes, torch's own layers (torch.nn.modules.*), numpy's ndarray and plain dtype classes."""
    import numpy as np
    import torch
    if module.startswith('torch.nn.modules.') and module in sys.modules:
        obj = getattr(sys.modules[module], name, None)
        return obj if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == module else None
    if module == 'torch':
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype) or (re.fullmatch(r'[A-Za-z0-9]+Storage', name) and isinstance(obj, type)):
            return obj
    if module == 'torch.storage' and name in ('UntypedStorage', 'TypedStorage'):
        return getattr(torch.storage, name)
    if (module, name) == ('numpy', 'ndarray'):
        return np.ndarray
    if module == 'numpy.dtypes' and re.fullmatch(r'[A-Za-z0-9]+DType', name):
        cls = getattr(getattr(np, 'dtypes', None), name, None)
        if isinstance(cls, type) and np.dtype(cls()).str[1:] in PLAIN_DTYPES:
            return _np_dtype_class(cls)
    return None

def _instantiable(cls):
    """Classes that pickles make without calling them (NEWOBJ, copyreg._reconstructor), then BUILD."""
    import torch
    import dnnlib
    from torch_utils import persistence
    if cls in (dnnlib.EasyDict, collections.OrderedDict, dict):
        return True
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and (cls.__module__.startswith('torch.nn.modules.')
                                                                          or persistence.is_safe_class(cls))

#----------------------------------------------------------------------------
# The unpickler: Python's own, with the opcodes that call, build or hash replaced by checked ones.

_Base = pickle._Unpickler # pylint: disable=protected-access

class SafeUnpickler(_Base):
    """Unpickles only what the allow-list resolves; every call goes through a checked constructor."""
    dispatch = dict(_Base.dispatch)

    def __init__(self, file, name='the file', storage_loader=None, nested=False, **kwargs):
        super().__init__(file if isinstance(file, BoundedReader) else BoundedReader(file, name), **kwargs)
        self._storage_loader = storage_loader
        self._nested = nested # inside a nested storage: the outer load checks the depth of the whole

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise CodeNotAllowedError('it names a global by something other than text')
        return _resolve('builtins' if module == '__builtin__' else module, name)

    def persistent_load(self, pid):
        if self._storage_loader is None:
            raise UnsafeDataError('it holds a persistent id, which a plain pickle does not')
        return self._storage_loader(pid)

    def load(self):
        result = super().load()
        return result if self._nested else check_depth(result)

    def load_frame(self):
        frame_size, = struct.unpack('<Q', self.read(8))
        if frame_size > MAX_FRAME:
            raise UnsafeDataError(f'it declares a frame of {frame_size} bytes (pickle writes at most about 64 KiB)')
        self._unframer.load_frame(frame_size)
    dispatch[pickle.FRAME[0]] = load_frame

    # Calls.
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple) or not _is_checked(func):
            raise CodeNotAllowedError(f'it calls {_short(func)}, which safe loading does not allow')
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise CodeNotAllowedError(f'it makes {_short(cls)} with keyword arguments')
        self.append(_new(cls, args))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_inst(self):
        raise CodeNotAllowedError('it instantiates a class with the protocol-0 INST opcode')
    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self):
        raise CodeNotAllowedError('it instantiates a class with the protocol-1 OBJ opcode')
    dispatch[pickle.OBJ[0]] = load_obj

    # Object state.
    def load_build(self):
        state = self.stack.pop()
        _build(self.stack[-1], state)
    dispatch[pickle.BUILD[0]] = load_build

    # Hashing.
    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        _dict_target(self.stack[-1])[check_key(key)] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        target = _dict_target(self.stack[-1])
        for i in range(0, len(items) - 1, 2):
            target[check_key(items[i])] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        self.append({check_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set: # pylint: disable=unidiomatic-typecheck
            raise UnsafeDataError('it adds set items to something other than a set')
        target.update(check_key(x) for x in items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        self.append(frozenset(check_key(x) for x in items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_appends(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not list: # pylint: disable=unidiomatic-typecheck
            raise UnsafeDataError('it appends items to something other than a list')
        target.extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_append(self):
        value = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not list: # pylint: disable=unidiomatic-typecheck
            raise UnsafeDataError('it appends an item to something other than a list')
        target.append(value)
    dispatch[pickle.APPEND[0]] = load_append

_checked_ids = None

def _is_checked(func):
    """Only the constructors of the table are called (classes such as torch.Tensor or ndarray are not)."""
    global _table, _checked_ids # pylint: disable=global-statement
    if _checked_ids is None:
        _table = _table or _callables()
        _checked_ids = {id(f) for f in _table.values() if not isinstance(f, type)}
    return id(func) in _checked_ids or getattr(func, '__qualname__', '').startswith('_np_dtype_class.')

def _new(cls, args):
    """NEWOBJ: cls.__new__(cls) for allowed classes, without arguments; a checked constructor of the table
    (EasyDict, OrderedDict, ...) is called without arguments, as REDUCE would."""
    if isinstance(args, tuple) and not args and not isinstance(cls, type) and _is_checked(cls):
        return cls()
    if not _instantiable(cls) or not isinstance(args, tuple) or args:
        raise CodeNotAllowedError(f'it makes {_short(cls)}{"" if not args else " with arguments"}, which safe loading does not allow')
    return cls.__new__(cls)

def _dict_target(target):
    if not isinstance(target, dict):
        raise UnsafeDataError('it sets items of something other than a dict')
    return target

def _build(obj, state):
    """BUILD: only on instances (never classes) of torch's layers and our persistent classes (a plain dict state of
    attribute names), and on plain numpy arrays and dtypes (a checked state)."""
    import numpy as np
    import torch
    import dnnlib
    if isinstance(obj, type):
        raise CodeNotAllowedError(f'it sets the state of the class {obj.__name__}, which safe loading does not allow')
    if type(obj) is np.ndarray: # pylint: disable=unidiomatic-typecheck
        return _build_ndarray(obj, state)
    if type(obj) is np.dtype or isinstance(obj, np.dtype) and obj.str[1:] in PLAIN_DTYPES: # pylint: disable=unidiomatic-typecheck
        return _build_dtype(_plain_dtype(obj), state)
    if type(obj) in (dnnlib.EasyDict, collections.OrderedDict) and not state: # pylint: disable=unidiomatic-typecheck
        return None
    if not isinstance(obj, torch.nn.Module) or not _instantiable(type(obj)):
        raise CodeNotAllowedError(f'it sets the state of a {type(obj).__name__}, which safe loading does not allow')
    obj.__setstate__(plain_state(state, type(obj).__name__))
    return None

def plain_state(state, what):
    """The state of a module: a dict of attribute names (no dunder names) to values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and k.isidentifier() and not k.startswith('__') for k in state):
        raise UnsafeDataError(f'the state of a {what} is not a dict of attribute names')
    if any('hook' in k and v for k, v in state.items()): # module hooks are callables: a file may not install any
        raise UnsafeDataError(f'the state of a {what} installs hooks')
    return state

#----------------------------------------------------------------------------
# torch.save's formats, read without torch.load.

ZIP_MAGIC = b'PK\x03\x04'
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c

def _storage_dtype(storage_type):
    import torch
    if storage_type is torch.storage.UntypedStorage:
        return torch.uint8
    dtype = None
    if isinstance(storage_type, type) and issubclass(storage_type, torch.storage._LegacyStorage): # pylint: disable=protected-access
        with warnings.catch_warnings():
            warnings.simplefilter('ignore') # TypedStorage is deprecated
            dtype = storage_type.dtype
    if not isinstance(dtype, torch.dtype):
        raise UnsafeDataError(f'a storage of type {_short(storage_type)}')
    return dtype

def _typed_storage(data, dtype):
    import torch
    untyped = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if len(data) else torch.UntypedStorage(0)
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

def _storage_pid(pid):
    """('storage', type, key, location, numel[, view metadata]) -> (dtype, key, numel)."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != 'storage' or not isinstance(pid[2], str) \
            or not isinstance(pid[3], str) or (len(pid) == 6 and pid[5] is not None):
        raise UnsafeDataError(f'a persistent id {_short(pid)} other than a plain storage')
    return _storage_dtype(pid[1]), pid[2], _int(pid[4], 'a storage size')

def is_torchscript_zip(names):
    """TorchScript archives (torch.jit.save) hold constants.pkl and code/ records; they are never loaded safely."""
    return any(re.fullmatch(r'[^/]+/(constants\.pkl|code/.*)', name) for name in names)

def load_torch_zip(file, name):
    """torch.save's zip format: data.pkl unpickled safely, each storage read from its record after its size is checked."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise UnsafeDataError(f'not a readable zip archive ({err})') from None
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        if is_torchscript_zip(infos):
            raise CodeNotAllowedError('it is a TorchScript archive, whose code safe loading does not run')
        prefix = next(iter(infos), '').split('/')[0]
        pkl = infos.get(f'{prefix}/data.pkl')
        byteorder = infos.get(f'{prefix}/byteorder')
        if pkl is None:
            raise UnsafeDataError('a zip archive without the data.pkl of torch.save')
        if byteorder is not None and archive.read(byteorder)[:16] not in (b'little', sys.byteorder.encode()):
            raise UnsafeDataError('a big-endian archive')
        loaded = dict()
        def load_storage(pid):
            dtype, key, numel = _storage_pid(pid)
            if key not in loaded:
                info = infos.get(f'{prefix}/data/{key}')
                nbytes = numel * dtype.itemsize
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                    raise UnsafeDataError(f'storage {key} declares {nbytes} bytes, its record holds '
                                          f'{"none" if info is None else info.file_size}{"" if info is None or info.compress_type == zipfile.ZIP_STORED else " compressed"}')
                loaded[key] = _typed_storage(archive.read(info), dtype)
            storage = loaded[key]
            return storage if storage.dtype == dtype else _typed_storage(bytes(storage._untyped_storage), dtype) # pylint: disable=protected-access
        if pkl.file_size > _file_size(file) * 64 + (1 << 20):
            raise UnsafeDataError(f'data.pkl declares {pkl.file_size} bytes')
        with archive.open(pkl) as f:
            data = io.BytesIO(f.read())
        return SafeUnpickler(data, name, storage_loader=load_storage).load()

def load_torch_legacy(file, name):
    """torch.save's legacy format (used for storages nested in plain pickles): five pickles, then the storages' bytes."""
    reader = BoundedReader(file, name)
    def unpickle(storage_loader=None):
        return SafeUnpickler(reader, name, storage_loader=storage_loader, nested=True).load()
    if unpickle() != LEGACY_MAGIC:
        raise UnsafeDataError('not a file of torch.save')
    if unpickle() != 1001:
        raise UnsafeDataError('an unknown torch.save protocol version')
    info = unpickle()
    if not isinstance(info, dict) or info.get('little_endian') is not True:
        raise UnsafeDataError('a big-endian or unknown torch.save layout')
    declared = dict()
    def declare(pid):
        dtype, key, numel = _storage_pid(pid)
        if declared.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise UnsafeDataError(f'storage {key} is declared twice with different sizes')
        if numel * dtype.itemsize > reader.left():
            raise UnsafeDataError(f'storage {key} declares {numel * dtype.itemsize} bytes where {reader.left()} remain')
        return _LegacyStorage(key, dtype)
    result = unpickle(declare)
    keys = unpickle()
    if not isinstance(keys, list) or sorted(keys) != sorted(declared) or len(set(keys)) != len(keys):
        raise UnsafeDataError('the storages listed do not match those used')
    storages = dict()
    for key in keys:
        dtype, numel = declared[key]
        count = struct.unpack('<q', reader.read(8))[0]
        if count != numel:
            raise UnsafeDataError(f'storage {key} declares {numel} elements, its data {count}')
        storages[key] = _typed_storage(reader.read(numel * dtype.itemsize), dtype)
    if not isinstance(result, _LegacyStorage):
        raise UnsafeDataError('a nested torch.save holds something other than one storage')
    return storages[result.key]

class _LegacyStorage:
    """Placeholder for a storage whose bytes follow the pickle (nested storages hold just that storage)."""
    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype

def load_nested_storage(data):
    """torch.storage._load_from_bytes: a storage that a plain pickle holds as torch.save bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeDataError('a nested storage that is not bytes')
    if data[:4] == ZIP_MAGIC:
        return load_torch_zip(io.BytesIO(data), 'a nested storage')
    return load_torch_legacy(io.BytesIO(data), 'a nested storage')

def load_torch_file(file, name):
    """A file of torch.save (a training state), either format."""
    head = file.read(4)
    file.seek(0)
    if head == ZIP_MAGIC:
        return load_torch_zip(file, name)
    if head[:1] == b'\x80':
        return load_torch_legacy(file, name)
    raise UnsafeDataError('not a file of torch.save (neither its zip nor its legacy format)')

def load_pickle(file, name):
    """A plain pickle (protocol 2 or later), unpickled safely."""
    head = file.read(1)
    file.seek(0)
    if head != b'\x80':
        raise UnsafeDataError('not a pickle of protocol 2 or later')
    return SafeUnpickler(file, name).load()

#----------------------------------------------------------------------------
