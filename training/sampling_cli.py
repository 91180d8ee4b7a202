"""The sampling options of the command lines (generate.py, fid.py calc --network):
their click declarations, written once for both, and the checks that turn them
into a sampler and its arguments, with errors in the command lines' words."""

import math

import click
import numpy as np

import dnnlib
from training import solvers
from training.sampling import default_sigma_range

MAX_STEPS = 10000   # --steps
MAX_SEEDS = 1 << 25 # 33,554,432 images per run
FAST_SOLVERS = tuple(solvers.SOLVERS) # --solver names of training/solvers.py
SOLVER_SCHEDULES = {'edm': 'polynomial', 'polynomial': 'polynomial', 'logsnr': 'logsnr', 'time-uniform': 'time_uniform'}
ABLATION_SCHEDULES = ('vp', 've', 'linear') # sigma(t) of the ablation sampler
CHURN_OPTIONS = dict(S_churn=0, S_min=0, S_max=float('inf'), S_noise=1) # and their neutral values
OPTION_NAMES = dict(num_steps='--steps', discretization='--disc', max_order='--order', denoise_to_zero='--denoise-to-zero')

def option_name(key):
    """The command-line name of a sampler argument."""
    return OPTION_NAMES.get(key, '--' + key)

#----------------------------------------------------------------------------
# Declarations.

def sampler_options(prefix=''):
    """Decorator adding the sampler options, all unset (None) by default, with `prefix` before each help text."""
    options = [
        click.option('--steps', 'num_steps',      help='Number of sampling steps (noise levels)  [default: 18; EDM2 networks: 32]', metavar='INT', type=int),
        click.option('--sigma_min',               help='Lowest noise level  [default: varies]', metavar='FLOAT',  type=click.FloatRange(min=0, min_open=True)),
        click.option('--sigma_max',               help='Highest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True)),
        click.option('--rho',                     help='Time step exponent  [default: 7]', metavar='FLOAT',      type=click.FloatRange(min=0, min_open=True)),
        click.option('--S_churn', 'S_churn',      help='Stochasticity strength  [default: 0]', metavar='FLOAT',   type=click.FloatRange(min=0)),
        click.option('--S_min', 'S_min',          help='Stoch. min noise level  [default: 0]', metavar='FLOAT',   type=click.FloatRange(min=0)),
        click.option('--S_max', 'S_max',          help='Stoch. max noise level  [default: inf]', metavar='FLOAT', type=click.FloatRange(min=0)),
        click.option('--S_noise', 'S_noise',      help='Stoch. noise inflation  [default: 1]', metavar='FLOAT',   type=float),
        click.option('--solver',                  help='ODE solver: edm (Algorithm 2, the default), a low-step solver, or euler|heun alone: the '
                                                       'ablation sampler', type=click.Choice(['edm', *FAST_SOLVERS])),
        click.option('--disc', 'discretization',  help='Ablate time step discretization {t_i}', type=click.Choice(['vp', 've', 'iddpm', 'edm'])),
        click.option('--schedule',                help='Ablate noise schedule sigma(t) (vp|ve|linear), or the time steps of a low-step solver '
                                                       '(edm = polynomial, logsnr, time-uniform)', type=click.Choice([*ABLATION_SCHEDULES, *SOLVER_SCHEDULES])),
        click.option('--scaling',                 help='Ablate signal scaling s(t)', type=click.Choice(['vp', 'none'])),
        click.option('--order', 'max_order',      help='Order of a multistep low-step solver  [default: its highest]', metavar='INT', type=int),
        click.option('--sigmas',                  help='Noise levels of a low-step solver, instead of --steps and the schedule', metavar='LIST', type=str),
        click.option('--afs',                     help='Analytical first step of a low-step solver (one evaluation fewer)', is_flag=True, default=None),
        click.option('--denoise-to-zero',         help='End a low-step solver with one more evaluation, D(x; sigma_min)', is_flag=True, default=None),
    ]
    def decorate(fn):
        for option in reversed(options):
            if prefix:
                option = _with_prefix(option, prefix)
            fn = option(fn)
        return fn
    return decorate

def _with_prefix(option, prefix):
    """A click.option decorator whose help text starts with `prefix`."""
    def decorate(fn):
        fn = option(fn)
        fn.__click_params__[-1].help = prefix + fn.__click_params__[-1].help
        return fn
    return decorate

#----------------------------------------------------------------------------
# Checks: one call before loading the network, one after.

def _parse_sigmas(text):
    try:
        return solvers.check_sigmas(float(part) for part in text.split(','))
    except ValueError:
        raise ValueError(f'--sigmas must be at least two finite, positive, strictly decreasing noise levels such as 80,20,5,1,0.2,0.002; got {text!r}') from None

def _check_finite(key, value, low=None):
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f'{option_name(key)} must be a finite number' + ('' if low is None else f' >= {low:g}') + f', got {value:g}')

def resolve_sampler(**options):
    """(sampler, kwargs) for the command line's sampler options (unset ones None): sampler is 'edm' (EDM's
    Algorithm 2), 'ablation' (the reference's generalised sampler, chosen by --solver=euler|heun alone or any of
    --disc/--schedule=vp|ve|linear/--scaling) or a solver of training/solvers.py (any other --solver, or euler|heun
    with an option of those solvers). Raise ValueError naming the options unless they make one valid sampler."""
    given = {key: value for key, value in options.items() if value is not None}
    solver = given.pop('solver', None)
    fast_only = [key for key in ('max_order', 'sigmas', 'afs', 'denoise_to_zero') if key in given]
    fast_only += ['schedule'] if given.get('schedule') in SOLVER_SCHEDULES else []
    ablation = [key for key in ('discretization', 'scaling') if key in given]
    ablation += ['schedule'] if given.get('schedule') in ABLATION_SCHEDULES else []
    for key in ('rho', 'S_churn', 'S_min', 'S_noise'):
        if key in given:
            _check_finite(key, given[key], low=(0 if key == 'S_churn' else None))
    if math.isnan(given.get('S_max', 0)):
        raise ValueError('--S_max must be a number (inf for no upper limit), got nan')
    for key in ('sigma_min', 'sigma_max'):
        if key in given and not given[key] > 0: # also NaN
            raise ValueError(f'--{key} must be positive, got {given[key]:g}')
    if 'num_steps' in given and not 1 <= given['num_steps'] <= MAX_STEPS:
        raise ValueError(f'--steps must be an integer from 1 to {MAX_STEPS}, got {given["num_steps"]}')

    # A low-step solver: any --solver but edm, euler and heun, or euler|heun with an option of those solvers.
    if solver in FAST_SOLVERS and (solver not in ('euler', 'heun') or fast_only):
        if ablation:
            raise ValueError(f'{", ".join(map(option_name, ablation))}: options of the ablation sampler (--solver=euler|heun alone), not of --solver={solver}')
        churn = [key for key in CHURN_OPTIONS if key in given]
        if churn:
            raise ValueError(f'{", ".join(map(option_name, churn))}: churn is an option of --solver=edm; --solver={solver} is deterministic')
        return solver, _fast_solver_kwargs(solver, given)

    # EDM's sampler (--schedule=edm is its own) or the ablation sampler, as the reference chooses.
    if fast_only == ['schedule'] and given['schedule'] in ('edm', 'polynomial') and solver in (None, 'edm') and not ablation:
        fast_only = []
        del given['schedule']
    if fast_only:
        raise ValueError(f'{", ".join(map(option_name, fast_only))}: options of the low-step solvers; give --solver={"|".join(FAST_SOLVERS)}')
    if solver == 'edm' and ablation:
        raise ValueError(f'{", ".join(map(option_name, ablation))}: options of the ablation sampler, which takes --solver=euler|heun, not edm')
    if solver in (None, 'edm') and not ablation:
        return 'edm', given
    return 'ablation', dict(given, **({} if solver is None else {'solver': solver}))

def _fast_solver_kwargs(solver, given):
    """The arguments of solvers.SOLVERS[solver] for the given options; ValueError for a wrong combination."""
    kwargs = {key: value for key, value in given.items() if key not in ('afs', 'denoise_to_zero')}
    kwargs.update(afs=bool(given.get('afs')), denoise_to_zero=bool(given.get('denoise_to_zero')))
    if 'max_order' in given and solver not in solvers.ORDERS:
        raise ValueError(f'--order: --solver={solver} has a single order')
    if 'max_order' in given and given['max_order'] not in solvers.ORDERS[solver]:
        raise ValueError(f'--order of --solver={solver} must be one of {", ".join(map(str, solvers.ORDERS[solver]))}, got {given["max_order"]}')
    if 'schedule' in kwargs:
        kwargs['schedule'] = SOLVER_SCHEDULES[kwargs['schedule']]
    if 'sigmas' in given:
        others = [key for key in ('num_steps', 'sigma_min', 'sigma_max', 'rho', 'schedule') if key in given]
        if others:
            raise ValueError(f'--sigmas gives the noise levels; it takes no {", ".join(map(option_name, others))}')
        kwargs['sigmas'] = _parse_sigmas(given['sigmas'])
        return kwargs
    if kwargs.get('num_steps', 18) < 2:
        raise ValueError(f'--steps of --solver={solver} must be at least 2 (noise levels from sigma_max to sigma_min), got {kwargs["num_steps"]}')
    if 'rho' in given and kwargs.get('schedule') == 'logsnr':
        raise ValueError('--rho has no effect with --schedule=logsnr (uniform in log sigma)')
    return kwargs

def check_sampler_range(net, sampler, kwargs):
    """Raise ValueError unless the noise levels that `sampler` uses with `net` (its own limits applied) are
    finite, positive and increasing from sigma_min to sigma_max."""
    if sampler == 'ablation':
        default_min, default_max = default_sigma_range(kwargs.get('discretization', 'edm'))
    elif 'sigmas' in kwargs:
        return
    else:
        default_min, default_max = 0.002, 80
    net_sigma_min, net_sigma_max = getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', float('inf'))
    sigma_min = max(kwargs.get('sigma_min', default_min), net_sigma_min)
    sigma_max = min(kwargs.get('sigma_max', default_max), net_sigma_max)
    for key, value in (('sigma_min', sigma_min), ('sigma_max', sigma_max)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f'--{key} is {value:g} within the network\'s noise levels '
                             f'[{net_sigma_min:g}, {net_sigma_max:g}]; it must be finite and positive')
    if not sigma_min < sigma_max:
        raise ValueError(f'--sigma_min must be below --sigma_max, got {sigma_min:g} and {sigma_max:g} '
                         f'within the network\'s noise levels [{net_sigma_min:g}, {net_sigma_max:g}]')

#----------------------------------------------------------------------------
# Seeds and guidance.

def parse_seeds(s):
    """Seeds from a list such as '1,2,5-10' (at most MAX_SEEDS of them); as in the reference, any integer,
    taken modulo 2^32 by StackedRandomGenerator."""
    return dnnlib.util.parse_int_list(s, max_len=MAX_SEEDS)

def parse_guidance_interval(text):
    """'LO,HI' -> (lo, hi) with 0 <= lo < hi: guide for sigma in (lo, hi]; None or '' -> None."""
    if text is None or text == '':
        return None
    parts = text.split(',')
    try:
        lo, hi = (float(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not 0 <= lo < hi:
        raise ValueError(f'--guidance-interval must be LO,HI with 0 <= LO < HI (noise levels), got {text!r}')
    return lo, hi

def check_guidance_options(guidance, gnet_pkl, guidance_interval):
    """Raise ValueError for guidance options that do nothing; return the parsed guidance interval."""
    if not np.isfinite(guidance):
        raise ValueError(f'--guidance must be a finite number, got {guidance}')
    for name, value in [('--gnet', gnet_pkl), ('--guidance-interval', guidance_interval)]:
        if value is not None and guidance == 1:
            raise ValueError(f'{name} has no effect without --guidance (a weight other than 1)')
    return parse_guidance_interval(guidance_interval)

def check_guidance(net, gnet=None, guidance=1):
    """Raise ValueError unless `net` can be guided by `gnet` (autoguidance) or, with gnet None, by itself
    without class labels (classifier-free guidance, only meaningful for a network trained with label dropout)."""
    if not np.isfinite(guidance):
        raise ValueError(f'--guidance must be a finite number, got {guidance}')
    if gnet is not None:
        for name in ('img_resolution', 'img_channels', 'label_dim'):
            if getattr(gnet, name) != getattr(net, name):
                raise ValueError(f'--gnet has {name}={getattr(gnet, name)}, the network {name}={getattr(net, name)}')
    elif guidance != 1 and not net.label_dim:
        raise ValueError('--guidance without --gnet is classifier-free guidance, which needs a conditional network; give --gnet')
    elif guidance != 1 and not getattr(getattr(net, 'model', None), 'label_dropout', 0) > 0:
        raise ValueError('--guidance without --gnet is classifier-free guidance, which needs a network trained with '
                         'label dropout (train.py --label-dropout); this one was not: give --gnet')

#----------------------------------------------------------------------------
