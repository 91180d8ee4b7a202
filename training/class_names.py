"""The classes that files may name: `class_name` strings read from a file (a run
folder's training_options.json, a .safetensors header) are built only when they
name one of these, for the role they play there. New classes are added here,
one line each."""

import importlib

import torch

#----------------------------------------------------------------------------

# Networks (preconditioners) that a .safetensors header or a run's network_kwargs may name.
NETWORK_CLASSES = (
    'training.networks.VPPrecond',
    'training.networks.VEPrecond',
    'training.networks.iDDPMPrecond',
    'training.networks.EDMPrecond',
    'training.networks_edm2.Precond',
)

# The entries of training_options.json that hold a class_name, and the classes each may name.
OPTION_CLASSES = {
    'network_kwargs':       NETWORK_CLASSES,
    'loss_kwargs':          ('training.loss.VPLoss', 'training.loss.VELoss', 'training.loss.EDMLoss', 'training.loss_edm2.EDM2Loss'),
    'encoder_kwargs':       ('training.encoders.StandardRGBEncoder', 'training.encoders.StabilityVAEEncoder'),
    'augment_kwargs':       ('training.augment.AugmentPipe',),
    'dataset_kwargs':       ('training.dataset.ImageFolderDataset',),
    'optimizer_kwargs':     ('torch.optim.Adam',),
    'data_loader_kwargs':   ('torch.utils.data.DataLoader',),
}

# The entries of training_options.json that hold a func_name, and the functions each may name.
OPTION_FUNCTIONS = {
    'lr_kwargs':            ('training.loss_edm2.learning_rate_schedule',),
}

#----------------------------------------------------------------------------

def check_class_name(class_name, allowed, source):
    """`class_name` if it is one of `allowed`, else ValueError naming `source` and the choices."""
    if not isinstance(class_name, str) or class_name not in allowed:
        shown = repr(class_name) if isinstance(class_name, str) and len(class_name) <= 100 else type(class_name).__name__
        raise ValueError(f'{source}: class_name {shown} is not one of {", ".join(allowed)}')
    return class_name

def network_class(class_name, source):
    """The network class that `class_name` (from a file) names, among NETWORK_CLASSES."""
    module_name, name = check_class_name(class_name, NETWORK_CLASSES, source).rsplit('.', 1)
    return getattr(importlib.import_module(module_name), name)

def check_options(options, source):
    """Check every class_name in a run's options (training_options.json) against OPTION_CLASSES; other
    entries that hold a class_name are refused too."""
    if not isinstance(options, dict):
        raise ValueError(f'{source} does not hold a dict of options')
    for key, value in options.items():
        if isinstance(value, dict) and 'class_name' in value:
            if key not in OPTION_CLASSES:
                raise ValueError(f'{source}: {key} names a class ({value["class_name"]!r:.100}), which no option of a run does')
            check_class_name(value['class_name'], OPTION_CLASSES[key], f'{source} ({key})')
        if isinstance(value, dict) and 'func_name' in value:
            if key not in OPTION_FUNCTIONS:
                raise ValueError(f'{source}: {key} names a function ({value["func_name"]!r:.100}), which no option of a run does')
            check_class_name(value['func_name'], OPTION_FUNCTIONS[key], f'{source} ({key})')
    return options

#----------------------------------------------------------------------------
# Construction arguments read from a file (a .safetensors header, init_kwargs of a pickle): checked before anything
# of their size is allocated.

def _largest_int(value):
    """The largest integer in parsed JSON (iteratively: the JSON is as deep as the file makes it)."""
    largest, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            largest = max(largest, item)
        elif isinstance(item, (list, tuple, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return largest

def check_construction(path, cls, init_args, init_kwargs, shapes):
    """The weights that the arguments read from a file construct must be those in the file (`shapes`): compared
    on the meta device, before anything is allocated. Classes that compute constants while constructed (VPPrecond) cannot be built
    there; for them no argument may exceed the largest dimension of the file's tensors."""
    try:
        with torch.device('meta'):
            expected = {name: tuple(t.shape) for name, t in cls(*init_args, **init_kwargs).state_dict().items()}
    except (RuntimeError, NotImplementedError):
        largest = max((max(shape, default=1) for shape in shapes.values()), default=1)
        if _largest_int([init_args, init_kwargs]) > max(largest, 4096):
            raise ValueError(f'{path}: the construction arguments ask for more than the file\'s tensors hold') from None
        return
    same_shapes(path, cls, expected, shapes)

def same_shapes(path, cls, expected, shapes):
    """ValueError naming `path` unless {name: shape} of the weights `cls` constructs equal those of the file."""
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))[:3]
        raise ValueError(f'{path}: the weights do not fit the {cls.__name__} that its construction arguments describe (e.g. {diff})')

#----------------------------------------------------------------------------
