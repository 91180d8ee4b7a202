"""Persistent classes: pickles that carry the source code of their defining
module, so they load after the code has changed or is gone (format version 6,
the one used by the published EDM network pickles)."""

import ast
import copy
import functools
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib
from torch_utils import safe_pickle

#----------------------------------------------------------------------------

_version            = 6         # Format version; must match in both directions.
_decorators         = set()     # {decorator_class, ...}
_import_hooks       = []        # [hook_function, ...]
_module_to_src_dict = dict()    # {module: src, ...}
_src_to_module_dict = dict()    # {src: module, ...}

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle together with the source code of the
    class's whole module, and record their constructor arguments
    (`init_args`, `init_kwargs`)."""
    if not isinstance(orig_class, type):
        raise TypeError('persistent_class() expects a class')
    if is_persistent(orig_class):
        return orig_class

    if orig_class.__module__ not in sys.modules:
        raise ValueError(f'module {orig_class.__module__!r} of {orig_class.__name__} is not loaded')
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record_init_args = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record_init_args else None
            self._init_kwargs = copy.deepcopy(kwargs) if record_init_args else None
            if orig_class.__name__ not in orig_module.__dict__:
                raise ValueError(f'{orig_class.__name__} must be defined at the top level of its module')
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            if self._init_args is None:
                raise AttributeError('init_args were not recorded (_record_init_args = False)')
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            if self._init_kwargs is None:
                raise AttributeError('init_kwargs were not recorded (_record_init_args = False)')
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src, class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj # reconstruct func
                fields[1] = (meta,) # reconstruct args
                fields[2] = None # state dict
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    _decorators.add(Decorator)
    return Decorator

#----------------------------------------------------------------------------

def is_persistent(obj):
    """Is the object or class persistent, i.e. will it save its source code when pickled?"""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators # pylint: disable=unidiomatic-typecheck

#----------------------------------------------------------------------------

def import_hook(hook):
    """Register a function called with the `meta` dict of every persistent
    object being unpickled, before its source is executed; it returns the
    (possibly modified) meta. Use it to patch old source code on load."""
    if not callable(hook):
        raise TypeError('import_hook() expects a callable')
    _import_hooks.append(hook)

#----------------------------------------------------------------------------

def _checked_meta(meta):
    """The meta dict of a persistent object after the import hooks, checked for format version and type."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise ValueError('a persistence import hook returned None')
    if meta.get('version') != _version:
        raise ValueError(f'unsupported persistence format version {meta.get("version")} (expected {_version})')
    if meta.get('type') != 'class':
        raise ValueError(f'unsupported persistent object type {meta.get("type")!r}')
    return meta

def _with_state(obj, state):
    """obj (made with __new__) given its pickled state, as pickle would."""
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(state) # pylint: disable=not-callable
    else:
        obj.__dict__.update(state)
    return obj

def _reconstruct_persistent_obj(meta):
    """Hook called by pickle to rebuild a persistent object from its meta dict."""
    meta = _checked_meta(meta)
    module = _src_to_module(meta.module_src)
    orig_class = module.__dict__[meta.class_name]
    decorator_class = persistent_class(orig_class)
    obj = decorator_class.__new__(decorator_class)

    return _with_state(obj, meta.state)

#----------------------------------------------------------------------------
# Safe loading: unpickle without running code carried by the file (torch_utils/safe_pickle.py).

# The persistent classes that safe loading rebuilds: (module the pickle was written from, class name) -> this
# project's class. '*' takes every persistent class of that module under its own name. A pickle names a class
# only by its name (its module's source comes with it, parsed and never run), so a name must resolve to one class.
PERSISTENT_CLASSES = {
    ('training.networks', '*'):     'training.networks',
    ('training.loss', '*'):         'training.loss',
    ('training.augment', '*'):      'training.augment',
    # EDM2 (Karras et al. 2024): its networks, its loss (written in its training loop) and its encoders.
    ('training.networks_edm2', '*'):            'training.networks_edm2',
    ('training.training_loop', 'EDM2Loss'):     'training.loss_edm2.EDM2Loss',
    ('training.loss_edm2', '*'):                'training.loss_edm2',
    ('training.encoders', '*'):                 'training.encoders',
}

CodeNotAllowedError = safe_pickle.CodeNotAllowedError

_safe_classes = None # {class name: [class, ...]}, filled on first use.

def safe_classes():
    """{class name: [class, ...]} of the persistent classes that safe loading rebuilds (PERSISTENT_CLASSES)."""
    global _safe_classes # pylint: disable=global-statement
    if _safe_classes is None:
        import importlib
        classes = dict()
        for (_, name), target in PERSISTENT_CLASSES.items():
            if name == '*':
                module = importlib.import_module(target)
                found = [(n, obj) for n, obj in vars(module).items() if is_persistent(obj) and obj.__module__ == target]
            else:
                module_name, class_name = target.rsplit('.', 1)
                found = [(name, getattr(importlib.import_module(module_name), class_name))]
            for n, obj in found:
                if obj not in classes.setdefault(n, []):
                    classes[n].append(obj)
        _safe_classes = classes
    return _safe_classes

def is_safe_class(cls):
    """Is `cls` one of the classes that safe loading rebuilds?"""
    return any(cls in found for found in safe_classes().values())

def _defines_class(src, class_name):
    """Does a module source define the class at its top level? Parsed, never executed; a source that
    does not parse is not run either, so only the class name counts then."""
    names = _top_level_classes(src)
    return names is None or class_name in names

@functools.lru_cache(maxsize=16)
def _top_level_classes(src):
    """The names of the classes a module source defines at its top level (None if it does not parse); parsed
    once per source, as every layer of a network pickle carries the same module source."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    return frozenset(node.name for node in tree.body if isinstance(node, ast.ClassDef))

def reconstruct_safe_obj(meta):
    """Rebuild a persistent object from this project's class of the same name, with the pickled state;
    the module source in `meta` is parsed to check that it defines the class, and never executed."""
    if not isinstance(meta, dict) or not isinstance(meta.get('state'), dict) or not isinstance(meta.get('class_name'), str) \
            or not isinstance(meta.get('module_src'), str):
        raise safe_pickle.UnsafeDataError('a persistent object whose meta is not (class_name, module_src, state)')
    meta = _checked_meta(meta)
    found = safe_classes().get(meta.class_name, [])
    if len(found) != 1 or not _defines_class(meta.module_src, meta.class_name):
        modules = sorted({module for module, _ in PERSISTENT_CLASSES})
        raise CodeNotAllowedError(f'it holds class {meta.class_name[:80]} of a module embedded in the pickle, not one of this project\'s classes'
                                  f' ({", ".join(modules)}); loading it would run the code it carries')
    cls = found[0]
    obj = cls.__new__(cls)
    return _with_state(obj, safe_pickle.plain_state(meta.state, meta.class_name))

def load(file, allow_code=False, name='the file'):
    """Unpickle a file object. By default safely (torch_utils/safe_pickle.py): only tensors, arrays, containers and
    this project's persistent classes, with sizes and nesting checked; CodeNotAllowedError for anything else.
    allow_code=True unpickles in full, running the source that persistent objects carry."""
    return pickle.load(file) if allow_code else safe_pickle.load_pickle(file, name)

def torch_load(file, allow_code=False, map_location='cpu', name='the file'):
    """A file of torch.save (a training state): read safely without torch.load, or with torch.load in full if allow_code=True."""
    if not allow_code:
        return safe_pickle.load_torch_file(file, name)
    import torch
    return torch.load(file, map_location=map_location, weights_only=False)

def refused_message(source, err):
    """One line for a file that safe loading refused: what it names, and how to opt in."""
    return f'{source}: {err}; pass --allow-code (allow_code=True in the API) to load it in full if you trust the file'

def load_error_message(source, what, err):
    """One line for any failure to load `source` (a `what`): refusals, damaged files, and whatever Python, numpy
    or PyTorch raise on them (RuntimeError, MemoryError, RecursionError, OverflowError, ...)."""
    if isinstance(err, CodeNotAllowedError):
        return refused_message(source, err)
    try:
        text = str(err)
    except Exception: # pylint: disable=broad-exception-caught
        text = ''
    text = ' '.join(text.split())
    text = text if len(text) <= 300 else text[:297] + '...'
    return f'{source} is not a readable {what} ({type(err).__name__}{": " + text if text else ""})'

#----------------------------------------------------------------------------

def _module_to_src(module):
    """Source code of a module (cached; modules executed from pickles keep theirs)."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src):
    """Execute source code as a fresh module, once per distinct source text."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = "_imported_module_" + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__) # pylint: disable=exec-used
    return module

#----------------------------------------------------------------------------

def _check_pickleable(obj):
    """Fail early if the state cannot be pickled; large tensors and arrays are skipped for speed."""
    def recurse(obj):
        if isinstance(obj, (list, tuple, set)):
            return [recurse(x) for x in obj]
        if isinstance(obj, dict):
            return [[recurse(x), recurse(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)):
            return None # Python primitive types are pickleable.
        if f'{type(obj).__module__}.{type(obj).__name__}' in ['numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter']:
            return None # NumPy arrays and PyTorch tensors are pickleable.
        if is_persistent(obj):
            return None # Persistent objects are pickleable, by virtue of the constructor check.
        if type(obj).__module__.startswith('torch.nn.') and hasattr(obj, '__dict__'):
            return recurse(vars(obj)) # torch's own containers (ModuleDict, ...): check their contents, skip their weights.
        return obj
    with io.BytesIO() as f:
        pickle.dump(recurse(obj), f)
