"""Command line for training EDM models: options -> config dict (build_config)
-> training.training_loop.training_loop."""

import json
import os
import random
import re
import shlex
import sys

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import class_names, phema, training_loop, training_state

#----------------------------------------------------------------------------
# Presets: network architectures and preconditioning/loss pairs.

ARCHITECTURES = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4]),
}

PRECONDITIONERS = { # --precond => (network class, loss class)
    'vp':  ('training.networks.VPPrecond',  'training.loss.VPLoss'),
    've':  ('training.networks.VEPrecond',  'training.loss.VELoss'),
    'edm': ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
}

# EDM2 presets of Karras et al. 2024 (Table 2 and Appendix; train_edm2.py of the EDM2 release): --preset.
# duration in Mimg, batch in images, cbase = model_channels, lr = alpha_ref, decay = t_ref in batches.
def _edm2_preset(duration_nimg, cbase, lr, decay, dropout, P_mean, P_std):
    return dict(duration=duration_nimg / 1e6, batch=2048, cbase=cbase, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std)

EDM2_PRESETS = {
    'edm2-img512-xs':  _edm2_preset(2048 << 20, 128, 0.0120, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-s':   _edm2_preset(2048 << 20, 192, 0.0100, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-m':   _edm2_preset(2048 << 20, 256, 0.0090, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-l':   _edm2_preset(1792 << 20, 320, 0.0080, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xl':  _edm2_preset(1280 << 20, 384, 0.0070, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xxl': _edm2_preset(896 << 20,  448, 0.0065, 70000, 0.10, -0.4, 1.0),
    'edm2-img64-s':    _edm2_preset(1024 << 20, 192, 0.0100, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-m':    _edm2_preset(2048 << 20, 256, 0.0090, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-l':    _edm2_preset(1024 << 20, 320, 0.0080, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-xl':   _edm2_preset(640 << 20,  384, 0.0070, 35000, 0.10, -0.8, 1.6),
}
EDM2_PHEMA_STDS = [0.050, 0.100] # the profiles the EDM2 release tracks

def apply_preset(opts, given):
    """opts with the --preset's values for the options not `given` on the command line (as train_edm2.py
    does: any preset value can be overridden)."""
    opts = dnnlib.EasyDict(opts)
    if opts.get('preset') is None:
        return opts
    if opts.preset not in EDM2_PRESETS:
        raise ValueError(f'--preset must be one of {", ".join(EDM2_PRESETS)}, not {opts.preset!r}')
    for name, value in EDM2_PRESETS[opts.preset].items():
        if name not in given or opts.get(name) is None:
            opts[name] = value
    return opts

def build_edm2_config(c, opts, dataset, device_type):
    """The EDM2 parts of config c (--preset): magnitude-preserving network, EDM2Loss with the learned
    uncertainty, Adam (0.9, 0.99) with the inverse-square-root schedule, power-function EMAs, no augmentation."""
    if dataset.num_channels not in (1, 3, 8):
        raise ValueError(f'--preset: {opts.data} has {dataset.num_channels} channels; EDM2 runs train on pixels (1 or 3 channels) '
                         'or on VAE latents (8: the mean and std of 4 channels, as EDM2\'s dataset_tool.py encode writes them)')
    if opts.get('augment_given'):
        raise ValueError('--augment: the EDM2 networks have no augmentation conditioning; leave --augment out with --preset')
    c.network_kwargs = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', model_channels=opts.cbase, dropout=opts.dropout,
                                       use_fp16=(opts.fp16 if opts.get('fp16_given') else device_type == 'cuda'))
    if opts.cres is not None:
        c.network_kwargs.channel_mult = list(opts.cres)
    if opts.label_dropout is not None:
        if not opts.cond:
            raise ValueError('--label-dropout drops class labels: it needs --cond=True')
        c.network_kwargs.label_dropout = opts.label_dropout
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss_edm2.EDM2Loss', P_mean=opts.P_mean, P_std=opts.P_std)
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9,0.99], eps=1e-8)
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.loss_edm2.learning_rate_schedule', ref_lr=opts.lr, ref_batches=opts.decay,
                                  rampup_Mimg=opts.lr_rampup / 1000)
    encoder = 'StabilityVAEEncoder' if dataset.num_channels == 8 else 'StandardRGBEncoder' # as the EDM2 release chooses
    c.encoder_kwargs = dnnlib.EasyDict(class_name=f'training.encoders.{encoder}')
    c.pop('augment_kwargs', None)

#----------------------------------------------------------------------------

def describe_dataset(dataset_kwargs):
    """Open the training set once; return the facts the config needs (name, resolution, channels, size, labels)."""
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs) # subclass of training.dataset.Dataset
    try:
        return dnnlib.EasyDict(name=dataset_obj.name, resolution=dataset_obj.resolution, num_channels=dataset_obj.num_channels,
                               size=len(dataset_obj), has_labels=dataset_obj.has_labels)
    finally:
        dataset_obj.close()

#----------------------------------------------------------------------------

def dataset_kwargs_from_opts(opts):
    return dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)

def build_config(opts, dataset, world_size=1, device_type='cuda'):
    """Turn the command-line options into the training config dict and the run description.

    `opts` holds the click options (with `seed` already chosen), `dataset` the
    result of describe_dataset(). Raises ValueError with a one-line message for
    inconsistent options. Returns (config, desc).
    """
    opts = dnnlib.EasyDict(opts)
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dataset_kwargs_from_opts(opts)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers, prefetch_factor=2)
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9,0.999], eps=1e-8)

    # Dataset.
    c.dataset_kwargs.resolution = dataset.resolution # be explicit about the resolution
    c.dataset_kwargs.max_size = dataset.size # and the size
    if opts.cond and not dataset.has_labels:
        raise ValueError(f'--cond=True requires class labels in dataset.json, but {opts.data} has none')

    # Network architecture.
    if opts.arch not in ARCHITECTURES:
        raise ValueError(f'--arch must be one of {", ".join(ARCHITECTURES)}, not {opts.arch!r}')
    c.network_kwargs.update(ARCHITECTURES[opts.arch])

    # Preconditioning and loss function.
    if opts.precond not in PRECONDITIONERS:
        raise ValueError(f'--precond must be one of {", ".join(PRECONDITIONERS)}, not {opts.precond!r}')
    c.network_kwargs.class_name, c.loss_kwargs.class_name = PRECONDITIONERS[opts.precond]

    # Network options.
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = list(opts.cres)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)
    if opts.label_dropout is not None: # only when given, so that the presets stay as the reference writes them
        if not opts.cond:
            raise ValueError('--label-dropout drops class labels: it needs --cond=True')
        c.network_kwargs.label_dropout = opts.label_dropout
    if opts.get('preset') is not None:
        build_edm2_config(c, opts, dataset, device_type)
    elif any(opts.get(name) is not None for name in ('decay', 'P_mean', 'P_std')):
        raise ValueError('--decay, --P_mean and --P_std set the EDM2 recipe: they need --preset')
    check_architecture({'channel_mult': [1,2,3,4], **c.network_kwargs}, dataset, opts) # (EDM2's default channel_mult)

    # Training options.
    c.total_kimg = max(int(opts.duration * 1000), 1)
    c.ema_halflife_kimg = int(opts.ema * 1000)
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, cudnn_benchmark=opts.bench)
    if opts.precision != 'fp32' or opts.compile: # recorded only when used, so default configs stay as the reference writes them
        c.update(precision=opts.precision, compile=opts.compile)
    tick = int(opts.tick) if float(opts.tick).is_integer() else opts.tick # whole kimg recorded as the reference does
    c.update(kimg_per_tick=tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    if opts.get('phema') is None and opts.get('preset') is not None:
        c.phema_kwargs = dnnlib.EasyDict(stds=list(EDM2_PHEMA_STDS), snapshot_kimg=opts.get('phema_snap'))
    elif opts.get('phema') is not None: # recorded only when used, as precision
        c.phema_kwargs = dnnlib.EasyDict(stds=phema.parse_stds(opts.phema, '--phema'), snapshot_kimg=opts.get('phema_snap'))
    elif opts.get('phema_snap') is not None:
        raise ValueError('--phema-snap needs --phema (the relative standard deviations to track)')
    if opts.get('safetensors'): # recorded only when used, as precision
        c.safetensors = True
    check_batch(opts.batch, opts.batch_gpu, world_size)

    # Random seed.
    c.seed = opts.seed

    # Transfer learning and resume.
    if opts.transfer is not None:
        if opts.resume is not None:
            raise ValueError('--transfer and --resume cannot be used together')
        if not dnnlib.util.is_url(opts.transfer, allow_file_urls=True):
            check_readable(opts.transfer, '--transfer')
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        match = training_state.STATE_NAME_RE.fullmatch(os.path.basename(opts.resume))
        if not match:
            raise ValueError(f'--resume must name a training-state-NNNNNN.pt file of a previous run, not {opts.resume}')
        check_readable(opts.resume, '--resume')
        resume_pkl = training_state.snapshot_path(os.path.dirname(opts.resume), match.group(1))
        if os.path.isfile(resume_pkl):
            c.resume_pkl = resume_pkl
        c.resume_kimg = training_state.label_kimg(match.group(1))
        c.resume_state_dump = opts.resume

    # Description string.
    if opts.desc is not None and any(part in opts.desc for part in ('/', '\\', '..', os.sep)):
        raise ValueError(f'--desc={opts.desc} must not contain path separators or ".."; it names a folder inside --outdir')
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if c.network_kwargs.use_fp16 else 'fp32'
    devices_str = f'gpus{world_size}' if device_type != 'cpu' else ('cpu' if world_size == 1 else f'cpu{world_size}')
    model_str = opts.preset if opts.get('preset') is not None else f'{opts.arch}-{opts.precond}'
    desc = f'{dataset.name}-{cond_str}-{model_str}-{devices_str}-batch{c.batch_size}-{dtype_str}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    return c, desc

def check_readable(path, option):
    """Raise ValueError unless `path` is a file this process can read."""
    if not os.path.isfile(path):
        raise ValueError(f'{option}: {path} does not exist')
    try:
        with open(path, 'rb'):
            pass
    except OSError as err:
        raise ValueError(f'{option}: cannot read {path}: {err.strerror}') from None

def check_batch(batch, batch_gpu, world_size):
    if batch % world_size != 0:
        raise ValueError(f'--batch={batch} is not divisible by the number of GPUs ({world_size})')
    per_gpu = batch // world_size
    if batch_gpu is not None and batch_gpu < per_gpu and per_gpu % batch_gpu != 0:
        raise ValueError(f'--batch={batch} is not divisible by {world_size} GPUs x --batch-gpu={batch_gpu}')

def check_architecture(network_kwargs, dataset, opts):
    """Reject datasets whose images the chosen U-Net cannot process."""
    levels = len(network_kwargs['channel_mult'])
    res = dataset.resolution
    if levels < 1:
        raise ValueError('--cres must list at least one channel multiplier')
    if res < 2 ** (levels - 1) or res % 2 ** (levels - 1) != 0:
        raise ValueError(f'{opts.data}: {res}x{res} images cannot be halved {levels - 1} times for the {levels} resolution levels of '
                         f'--cres={",".join(map(str, network_kwargs["channel_mult"]))}; the resolution must be divisible by {2 ** (levels - 1)}')
    if dataset.num_channels not in (1, 3) and not (opts.get('preset') is not None and dataset.num_channels == 8):
        raise ValueError(f'{opts.data}: images have {dataset.num_channels} channels; RGB (3) or grayscale (1) images are supported '
                         '(and, with --preset, EDM2\'s 8-channel VAE latents)')
    if network_kwargs['model_channels'] < 1 or any(m < 1 for m in network_kwargs['channel_mult']):
        raise ValueError('--cbase and --cres must be positive')

#----------------------------------------------------------------------------

def pick_run_dir(outdir, desc, nosubdir=False):
    """`{outdir}/{next id:05d}-{desc}`, the id one above the largest numbered entry (or outdir itself with --nosubdir)."""
    if nosubdir:
        return outdir
    prev_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'^\d+', name)
            if match and os.path.isdir(os.path.join(outdir, name)):
                prev_ids.append(int(match.group()))
    cur_id = max(prev_ids, default=-1) + 1
    return os.path.join(outdir, f'{cur_id:05d}-{desc}')

RUN_FILES = re.compile(r'training_options\.json|network-snapshot-[\d.]+\.pkl|training-state-[\d.]+\.pt')

def holds_run(folder):
    """True when `folder` holds the files of a training run."""
    return os.path.isdir(folder) and any(RUN_FILES.fullmatch(name) for name in os.listdir(folder))

def create_run_dir(outdir, desc, nosubdir=False, resume=None):
    """Create and return a new run folder: the next free `{outdir}/{id:05d}-{desc}`, claimed with os.mkdir so that
    runs started together get different ids. With --nosubdir, `outdir` itself, unless it holds another run
    (resuming one of its own states is allowed)."""
    if nosubdir:
        own_resume = resume is not None and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(outdir)
        if holds_run(outdir) and not own_resume:
            raise ValueError(f'--nosubdir: {outdir} already holds a training run; choose another --outdir, or --resume one of its training states')
        os.makedirs(outdir, exist_ok=True)
        return outdir
    os.makedirs(outdir, exist_ok=True)
    while True:
        run_dir = pick_run_dir(outdir, desc)
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            continue # another run took this id first

def previous_seed(resume):
    """The seed recorded by the run that wrote the --resume state, or None."""
    if resume is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(resume), 'training_options.json'), 'rt') as f:
            seed = json.load(f).get('seed')
    except (OSError, ValueError, AttributeError):
        return None
    return seed if isinstance(seed, int) else None

def random_seed(device):
    """A random seed chosen by rank 0 and broadcast to every rank."""
    seed = torch.tensor(random.SystemRandom().randrange(1 << 31), dtype=torch.int64)
    if dist.get_world_size() > 1:
        seed = seed.to(device if device.type == 'cuda' else torch.device('cpu'))
        torch.distributed.broadcast(seed, src=0)
    return int(seed)

#----------------------------------------------------------------------------
# Resuming a run in its own folder: --resume=<run folder>|latest, or the same command again.

# Options of the command line => the entries of training_options.json they set. When resuming, an option given
# with another value than the run's is an error; --duration may change (a longer or shorter run).
OPTION_KEYS = {
    'data': ['dataset_kwargs.path'], 'cond': ['dataset_kwargs.use_labels'], 'xflip': ['dataset_kwargs.xflip'],
    'cache': ['dataset_kwargs.cache'], 'workers': ['data_loader_kwargs.num_workers'],
    'arch': [f'network_kwargs.{key}' for key in ('model_type', 'embedding_type', 'encoder_type', 'decoder_type', 'channel_mult_noise', 'resample_filter')],
    'precond': ['network_kwargs.class_name', 'loss_kwargs.class_name'],
    'batch': ['batch_size'], 'batch_gpu': ['batch_gpu'], 'cbase': ['network_kwargs.model_channels'], 'cres': ['network_kwargs.channel_mult'],
    'lr': ['optimizer_kwargs.lr'], 'lr_rampup': ['lr_rampup_kimg'], 'ema': ['ema_halflife_kimg'],
    'phema': ['phema_kwargs.stds'], 'phema_snap': ['phema_kwargs.snapshot_kimg'], 'dropout': ['network_kwargs.dropout'],
    'augment': ['augment_kwargs', 'network_kwargs.augment_dim'], 'fp16': ['network_kwargs.use_fp16'], 'ls': ['loss_scaling'],
    'bench': ['cudnn_benchmark'], 'precision': ['precision'], 'compile': ['compile'], 'tick': ['kimg_per_tick'],
    'snap': ['snapshot_ticks'], 'dump': ['state_dump_ticks'], 'seed': ['seed'], 'label_dropout': ['network_kwargs.label_dropout'],
    'preset': ['network_kwargs.class_name', 'loss_kwargs.class_name'], 'decay': ['lr_kwargs.ref_batches'],
    'P_mean': ['loss_kwargs.P_mean'], 'P_std': ['loss_kwargs.P_std'],
}
RUN_SPECIFIC = ('run_dir', 'resume_pkl', 'resume_state_dump', 'resume_kimg', 'tensorboard', 'safetensors') # not part of what a run trains

def _lookup(config, dotted):
    for key in dotted.split('.'):
        config = config.get(key) if isinstance(config, dict) else None
    return config

def _as_json(config):
    return json.loads(json.dumps(config))

def read_options(run_dir):
    """The run's training_options.json as a dict, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(run_dir, 'training_options.json'), 'rt') as f:
            options = json.load(f)
    except (OSError, ValueError):
        return None
    return options if isinstance(options, dict) else None

def latest_state(run_dir):
    """(path, kimg) of the run's newest training state, or (None, None)."""
    path, label = training_state.latest_state(run_dir)
    return path, (training_state.label_kimg(label) if label is not None else None)

def run_folders(outdir):
    """The numbered run folders in outdir, newest (highest id) first."""
    if not os.path.isdir(outdir):
        return []
    folders = [(int(m.group()), name) for name in os.listdir(outdir) for m in [re.match(r'^\d+', name)] if m]
    return [os.path.join(outdir, name) for _, name in sorted(folders, reverse=True) if holds_run(os.path.join(outdir, name))]

def run_folder_to_resume(resume, outdir):
    """The run folder named by --resume=<run folder> or --resume=latest (the newest run in --outdir)."""
    if resume != 'latest':
        if read_options(resume) is None:
            raise ValueError(f'--resume: {resume} is not a run folder (it has no readable training_options.json)')
        return resume
    if outdir is None:
        raise ValueError('--resume=latest needs --outdir (it continues the newest run there)')
    for folder in run_folders(outdir):
        if read_options(folder) is not None:
            return folder
    raise ValueError(f'--resume=latest: {outdir} holds no training run')

def find_interrupted_run(outdir, c, nosubdir=False, same_seed=True):
    """The newest run folder whose options equal config `c` (the seed too if same_seed) and which stopped before
    total_kimg with a training state; None when there is none."""
    ignored = RUN_SPECIFIC + (() if same_seed else ('seed',))
    wanted = {k: v for k, v in _as_json(c).items() if k not in ignored}
    for folder in ([outdir] if nosubdir else run_folders(outdir)):
        recorded = read_options(folder) if os.path.isdir(folder) else None
        if recorded is None or {k: v for k, v in recorded.items() if k not in ignored} != wanted:
            continue
        _, kimg = latest_state(folder)
        if kimg is not None and kimg < recorded.get('total_kimg', 0):
            return folder
    return None

def check_given_options(recorded, opts, given, world_size, device_type):
    """Raise ValueError naming the first option given on the command line that differs from the resumed run's."""
    if 'transfer' in given:
        raise ValueError('--transfer and --resume cannot be used together')
    names = [name for name in OPTION_KEYS if name in given]
    if not names:
        return
    cmd = default_options(**{name: opts[name] for name in names})
    if 'preset' in given or _lookup(recorded, 'network_kwargs.class_name') == 'training.networks_edm2.Precond':
        cmd.preset = opts.preset if 'preset' in given else next(iter(EDM2_PRESETS)) # only the given options are compared
        cmd = apply_preset(cmd, set(names))
    cmd.data = opts.data if 'data' in given else _lookup(recorded, 'dataset_kwargs.path')
    cmd.seed = opts.seed if 'seed' in given else recorded.get('seed')
    c, _ = build_config(cmd, describe_dataset(dataset_kwargs_from_opts(cmd)), world_size=world_size, device_type=device_type)
    c = _as_json(c)
    for name in names:
        for key in OPTION_KEYS[name]:
            if _lookup(c, key) != _lookup(recorded, key):
                flag = '--' + name.replace('_', '-')
                raise ValueError(f'{flag}={opts[name]} conflicts with the resumed run, which has {key}={json.dumps(_lookup(recorded, key))}; '
                                 f'leave {flag} out to continue it, or start a new run')

def resume_config(run_dir, recorded, opts, given):
    """The config that continues run_dir in place from its newest training state: its recorded options (--duration
    and --tensorboard may change), with the state as resume_state_dump and the kimg it resumes from."""
    class_names.check_options(recorded, os.path.join(run_dir, 'training_options.json')) # builds only our classes
    state, kimg = latest_state(run_dir)
    if state is None:
        raise ValueError(f'--resume: {run_dir} holds no training-state-NNNNNN.pt to continue from')
    c = dnnlib.EasyDict({k: v for k, v in recorded.items() if k not in RUN_SPECIFIC})
    if 'duration' in given:
        c.total_kimg = max(int(opts.duration * 1000), 1)
    if opts.tensorboard or recorded.get('tensorboard'):
        c.tensorboard = True
    if opts.get('safetensors') or recorded.get('safetensors'):
        c.safetensors = True
    snapshot = training_state.snapshot_path(run_dir, os.path.basename(state)[len('training-state-'):-len('.pt')])
    if os.path.isfile(snapshot):
        c.resume_pkl = snapshot
    c.update(resume_state_dump=state, resume_kimg=kimg)
    return c

def continue_command(run_dir, opts):
    """The command that continues a stopped run."""
    launcher = 'python' if dist.get_world_size() == 1 else f'torchrun --standalone --nproc_per_node={dist.get_world_size()}'
    device = f' --device={opts.device}' if opts.device is not None else ''
    return f'{launcher} {shlex.quote(sys.argv[0])} --resume={shlex.quote(run_dir)}{device}'

#----------------------------------------------------------------------------

def parse_int_list(_ctx, _param, value):
    if value is None:
        return None
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None

@click.command()

# Main options.
@click.option('--outdir',        help='Where to save the results  [required]', metavar='DIR',       type=str)
@click.option('--data',          help='Path to the dataset  [required]', metavar='ZIP|DIR',         type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL',              type=bool, default=False, show_default=True)
@click.option('--arch',          help='Network architecture', metavar='ddpmpp|ncsnpp|adm',          type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True)
@click.option('--precond',       help='Preconditioning & loss function', metavar='vp|ve|edm',       type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)

# Hyperparameters.
@click.option('--duration',      help='Training duration', metavar='MIMG',                          type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',         help='Total batch size', metavar='INT',                            type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',     help='Limit batch size per GPU', metavar='INT',                    type=click.IntRange(min=1))
@click.option('--cbase',         help='Channel multiplier  [default: varies]', metavar='INT',       type=click.IntRange(min=1))
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=str, callback=parse_int_list)
@click.option('--lr',            help='Learning rate', metavar='FLOAT',                             type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr-rampup',     help='Learning rate ramp-up duration', metavar='KIMG',             type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',           help='EMA half-life', metavar='MIMG',                              type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--phema',         help='Post-hoc EMA: track power-function EMAs of these relative stds', metavar='LIST', type=str)
@click.option('--preset',        help='EDM2 configuration preset (EDM2 network and recipe)', metavar='edm2-img64-s|...', type=click.Choice(list(EDM2_PRESETS)))
@click.option('--decay',         help='EDM2 learning rate decay t_ref  [default: preset]', metavar='BATCHES', type=click.FloatRange(min=0))
@click.option('--P_mean', 'P_mean', help='EDM2 noise level mean  [default: preset]', metavar='FLOAT',  type=float)
@click.option('--P_std', 'P_std',  help='EDM2 noise level std  [default: preset]', metavar='FLOAT',    type=click.FloatRange(min=0, min_open=True))
@click.option('--dropout',       help='Dropout probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--label-dropout', help='Class label dropout probability, for classifier-free guidance', metavar='FLOAT', type=click.FloatRange(min=0, max=1, max_open=True))
@click.option('--augment',       help='Augment probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL',                     type=bool, default=False, show_default=True)

# Performance-related.
@click.option('--fp16',          help='Enable mixed-precision training', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--ls',            help='Loss scaling', metavar='FLOAT',                              type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',         help='Enable cuDNN benchmarking', metavar='BOOL',                  type=bool, default=True, show_default=True)
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL',                type=bool, default=True, show_default=True)
@click.option('--workers',       help='DataLoader worker processes', metavar='INT',                 type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--precision',     help='Training precision: fp32 (faithful), tf32, bf16 (autocast)', type=click.Choice(['fp32', 'tf32', 'bf16']), default='fp32', show_default=True)
@click.option('--compile',       help='torch.compile the network', metavar='BOOL',                  type=bool, default=False, show_default=True)
@click.option('--device',        help='Device to train on  [default: cuda if available]', metavar='STR', type=str, default=None)

# I/O-related.
@click.option('--desc',          help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',      help='Do not create a subdirectory for results',                   is_flag=True)
@click.option('--tick',          help='How often to print progress', metavar='KIMG',                type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',          help='How often to save snapshots', metavar='TICKS',               type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',          help='How often to dump state', metavar='TICKS',                   type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--phema-snap',    help='How often to save the --phema EMAs  [default: with snapshots]', metavar='KIMG', type=click.IntRange(min=1))
@click.option('--seed',          help='Random seed  [default: random]', metavar='INT',              type=int)
@click.option('--transfer',      help='Transfer learning from network pickle', metavar='PKL|URL',   type=str)
@click.option('--resume',        help='Resume from previous training state, or continue a run', metavar='PT|DIR|latest', type=str)
@click.option('--tensorboard',   help='Also write the statistics as TensorBoard events',            is_flag=True)
@click.option('--allow-code',    help='Load --transfer/--resume files that name code other than ours', is_flag=True)
@click.option('--safetensors',   help='Also write each snapshot\'s EMA as .safetensors (no code)', is_flag=True)
@click.option('-n', '--dry-run', help='Print training options and exit',                            is_flag=True)

def main(**kwargs):
    """Train a denoiser network with the EDM (or VP/VE) loss and
    preconditioning, on one or more GPUs or on the CPU.

    Examples:

    \b
    # Class-conditional CIFAR-10 with DDPM++ on 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # Continue a stopped run exactly where it stopped, in its own folder
    python train.py --resume=training-runs/00000-...      # or --resume=latest --outdir=training-runs
    python train.py ...                                   # the same command again does the same

    \b
    # Start a new run from a training state (as the reference does)
    python train.py ... --resume=training-runs/00000-.../training-state-000100.pt

    SIGTERM or Ctrl-C ends a run cleanly: it finishes the current step,
    writes a network snapshot and a training state, prints the command
    that continues it, and exits with status 0.

    \b
    # A small CPU run that finishes in minutes (README.md, "Training new models")
    python train.py --device=cpu --outdir=training-runs --data=datasets/digits-16x16.zip \\
        --cond=1 --cbase=32 --cres=1,2,2 --batch=64 --augment=0 \\
        --duration=0.02 --tick=2 --snap=5 --dump=5 --lr-rampup=2
    """
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    given = {name for name in kwargs if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    try:
        opts = apply_preset(opts, given)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    opts.update(augment_given=('augment' in given), fp16_given=('fp16' in given))
    try:
        device = dist.init(opts.device)
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    if opts.tensorboard:
        check_tensorboard()

    # Continue a run in its own folder: --resume=<run folder>|latest.
    resume_in_place = opts.resume is not None and (opts.resume == 'latest' or os.path.isdir(opts.resume))
    if resume_in_place:
        try:
            run_dir = run_folder_to_resume(opts.resume, opts.outdir)
            recorded = read_options(run_dir)
            check_given_options(recorded, opts, given, dist.get_world_size(), device.type)
            c = resume_config(run_dir, recorded, opts, given)
        except (ValueError, IOError) as err:
            raise click.ClickException(str(err)) from None
        return continue_run(c, run_dir, opts, device)
    for name in ('outdir', 'data'):
        if opts[name] is None:
            raise click.UsageError(f"Missing option '--{name}' (only --resume=<run folder> continues a run without it).")

    # Validate the options and the dataset.
    try:
        dataset = describe_dataset(dataset_kwargs_from_opts(opts))
    except (ValueError, IOError) as err:
        raise click.ClickException(f'--data: {err}') from None
    if opts.seed is None:
        opts.seed = previous_seed(opts.resume)
    if opts.seed is None:
        opts.seed = random_seed(device)
    try:
        c, desc = build_config(opts, dataset, world_size=dist.get_world_size(), device_type=device.type)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if opts.tensorboard:
        c.tensorboard = True

    # Resuming a state that already reaches --duration trains nothing, in the run it came from.
    if c.get('resume_state_dump') is not None and c.resume_kimg >= c.total_kimg:
        if not opts.dry_run:
            c.run_dir = os.path.dirname(c.resume_state_dump) if dist.get_rank() == 0 else None
            run_training(c, device, opts)
        return

    # The same command again continues its interrupted run (the newest with these options; any seed unless --seed).
    if opts.resume is None:
        run_dir = find_interrupted_run(opts.outdir, c, opts.nosubdir, same_seed=('seed' in given))
        if run_dir is not None:
            dist.print0(f'Continuing the interrupted run {run_dir} (same options)')
            return continue_run(resume_config(run_dir, read_options(run_dir), opts, given), run_dir, opts, device)

    # Pick output directory (created below).
    c.run_dir = pick_run_dir(opts.outdir, desc, opts.nosubdir) if dist.get_rank() == 0 else None

    # Print options.
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    if opts.get('preset') is not None:
        dist.print0(f'EDM2 preset:             {opts.preset}')
    else:
        dist.print0(f'Network architecture:    {opts.arch}')
        dist.print0(f'Preconditioning & loss:  {opts.precond}')
    dist.print0(f'Number of {"GPUs:     " if device.type == "cuda" else "processes:"}     {dist.get_world_size()}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0(f'Mixed-precision:         {c.network_kwargs.use_fp16}')
    dist.print0(f'Device:                  {device}')
    dist.print0()

    # Dry run?
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Create output directory.
    dist.print0('Creating output directory...')
    logger = None
    if dist.get_rank() == 0:
        try:
            c.run_dir = create_run_dir(opts.outdir, desc, opts.nosubdir, opts.resume)
            print(f'Output directory:        {c.run_dir}')
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            raise click.ClickException(f'cannot create the output directory {c.run_dir} (--outdir): {err.strerror or err}') from None
        try:
            with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
                json.dump(c, f, indent=2)
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
        except OSError as err:
            raise click.ClickException(f'cannot create the output directory {c.run_dir} (--outdir): {err.strerror or err}') from None

    # Train. A --resume that fails before the first tick (a truncated, empty or wrong file) leaves no new folder.
    try:
        run_training(c, device, opts)
    except BaseException:
        if logger is not None and c.get('resume_state_dump') is not None:
            logger.close()
            logger = None
            remove_unstarted_run(c.run_dir)
        raise
    finally:
        if logger is not None:
            logger.close()

def remove_unstarted_run(run_dir):
    """Remove a run folder that holds nothing but what train.py wrote before training (options, log)."""
    names = set(os.listdir(run_dir))
    if names <= {'training_options.json', 'log.txt'}:
        for name in names:
            os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)

def continue_run(c, run_dir, opts, device):
    """Train `c` in its run folder, appending to log.txt and stats.jsonl; training_options.json records the
    state it resumes from."""
    c.run_dir = run_dir if dist.get_rank() == 0 else None
    dist.print0()
    dist.print0(f'Resuming {run_dir} from {c.resume_state_dump} ({c.resume_kimg} kimg of {c.total_kimg})')
    if opts.dry_run:
        dist.print0(json.dumps(c, indent=2))
        dist.print0('Dry run; exiting.')
        return
    logger = None
    if dist.get_rank() == 0:
        try:
            with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'wt') as f:
                json.dump(c, f, indent=2)
            logger = dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
        except OSError as err:
            raise click.ClickException(f'cannot write to the run folder {run_dir}: {err.strerror or err}') from None
    try:
        run_training(c, device, opts)
    finally:
        if logger is not None:
            logger.close()

def check_tensorboard():
    """--tensorboard needs the tensorboard package: say so before any folder is created."""
    try:
        import torch.utils.tensorboard # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        raise click.ClickException('--tensorboard needs the tensorboard package (pip install tensorboard)') from None

def run_training(c, device, opts=None):
    """training_loop(**c); its errors as one line (naming the rank under torchrun). A stopped run prints the
    command that continues it."""
    prefix = f'rank {dist.get_rank()}: ' if dist.get_world_size() > 1 else ''
    try:
        result = training_loop.training_loop(**c, device=device, allow_code=bool(opts is not None and opts.get('allow_code')))
        if result.stopped and opts is not None and dist.get_rank() == 0:
            print(f'Continue with: {continue_command(c.run_dir, opts)}  (or rerun the same command)', flush=True)
        dist.barrier() # every rank done before the process group goes (gloo may abort a rank torn down mid-exchange)
        dist.finish()
    except dist.PeerError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(prefix + dnnlib.util.os_error_message(err)) from None
    except (ValueError, MemoryError) as err:
        raise click.ClickException(prefix + str(err)) from None
    except RuntimeError as err:
        if not dist.is_peer_error(err):
            raise
        raise click.ClickException(dist.peer_error_message(err)) from None

#----------------------------------------------------------------------------

def default_options(**overrides):
    """The command line's options with their defaults (as build_config takes them), updated by `overrides`."""
    opts = dnnlib.EasyDict(main.make_context('train.py', [], resilient_parsing=True).params)
    unknown = set(overrides) - set(opts)
    if unknown:
        raise ValueError(f'unknown options: {", ".join(sorted(unknown))}')
    opts.update(overrides)
    return opts

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
