"""The classes that files may name: `class_name` strings read from a file (a run
folder's training_options.json, a .safetensors header) are built only when they
name one of these, for the role they play there. New classes are added here,
one line each."""

import importlib

#----------------------------------------------------------------------------

# Networks (preconditioners) that a .safetensors header or a run's network_kwargs may name.
NETWORK_CLASSES = (
    'training.networks.VPPrecond',
    'training.networks.VEPrecond',
    'training.networks.iDDPMPrecond',
    'training.networks.EDMPrecond',
)

# The entries of training_options.json that hold a class_name, and the classes each may name.
OPTION_CLASSES = {
    'network_kwargs':       NETWORK_CLASSES,
    'loss_kwargs':          ('training.loss.VPLoss', 'training.loss.VELoss', 'training.loss.EDMLoss'),
    'augment_kwargs':       ('training.augment.AugmentPipe',),
    'dataset_kwargs':       ('training.dataset.ImageFolderDataset',),
    'optimizer_kwargs':     ('torch.optim.Adam',),
    'data_loader_kwargs':   ('torch.utils.data.DataLoader',),
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
    return options

#----------------------------------------------------------------------------
