"""Post-hoc EMA: power-function EMAs tracked during training, and the
least-squares reconstruction of any other EMA length afterwards (Karras et
al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Section 3 and Appendix C).

Run directory layout: for each tracked relative standard deviation S (three
decimals) and each save, `phema-NNNNNN-S.pkl` (NNNNNN = kimg, or NNNNNN.NNN
with fractional ticks, as in network-snapshot-NNNNNN.pkl) holds a network pickle,
dict(ema, loss_fn, augment_pipe, dataset_kwargs, phema), whose `ema` is the
power-function average and `phema` = dict(std, gamma, nimg) records its
sigma_rel, its exponent and the number of training images it has seen.
"""

import copy
import os
import pickle
import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import network_io, training_state
from training.fast_layers import set_fast_paths

SNAPSHOT_RE = re.compile(r'phema-(\d{6,}(?:\.\d{3})?)-(\d+\.\d+)\.pkl') # kimg as the run's other files name it, sigma_rel
EDM2_SNAPSHOT_RE = re.compile(r'network-snapshot-(\d{7})-(\d+\.\d+)\.pkl') # the EDM2 release's runs: kimg, sigma_rel in the name
MAX_SIGMA_REL = (1 / 12) ** 0.5 # sigma_rel of gamma = 0 (a plain average); no gamma > 0 is wider

#----------------------------------------------------------------------------
# Power-function profile (Section 3.1).

def gamma_to_sigma_rel(gamma):
    """Relative standard deviation of the profile tau**gamma on [0, t]."""
    gamma = float(gamma)
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5

def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma > 0 of relative standard deviation sigma_rel: the positive root of
    sigma_rel**2 * (gamma + 2)**2 * (gamma + 3) - (gamma + 1) = 0 (its other two roots are below 0)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f'relative standard deviation {sigma_rel:g} is outside (0, {MAX_SIGMA_REL:.4f}), '
                         f'the range of the power-function profiles')
    s2 = sigma_rel ** 2
    return float(np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1]).real.max())

def power_function_beta(gamma, nimg, batch_size):
    """beta(t) = (1 - 1/t)**(gamma + 1) for the step t = nimg / batch_size that brings the run to nimg images."""
    return (1 - batch_size / nimg) ** (gamma + 1)

def parse_stds(text, option='--std'):
    """'0.050,0.100' -> [0.05, 0.1], each a valid sigma_rel, distinct in the file names (three decimals)."""
    stds = []
    for part in str(text).split(','):
        try:
            std = float(part)
        except ValueError:
            raise ValueError(f'{option}: {part.strip()!r} is not a number (expected e.g. {option}=0.050,0.100)') from None
        try:
            sigma_rel_to_gamma(std)
        except ValueError as err:
            raise ValueError(f'{option}: {err}') from None
        stds.append(std)
    names = [f'{std:.3f}' for std in stds]
    if len(set(names)) != len(names):
        raise ValueError(f'{option}={text}: the values must differ in their first three decimals')
    return stds

def file_label(kimg):
    """The label of a run's files at `kimg`: NNNNNN for a whole kimg, NNNNNN.NNN otherwise (training_state.kimg_label)."""
    return training_state.kimg_label(round(kimg * 1000), fractional_ticks=not float(kimg).is_integer())

def snapshot_name(label, std):
    return f'phema-{label}-{std:.3f}.pkl'

#----------------------------------------------------------------------------
# Reconstruction by least squares (Appendix C.3).

def profile_inner_products(gammas_a, times_a, gammas_b, times_b):
    """Matrix of L2 inner products <p_i, p_j> of the unit-mass profiles p(tau) = (g + 1) tau**g / T**(g + 1) on [0, T]:

    A_ij = (g_i + 1)(g_j + 1) m**(g_i + g_j + 1) / ((g_i + g_j + 1) T_i**(g_i + 1) T_j**(g_j + 1)), m = min(T_i, T_j),
    computed as (g_i + 1)(g_j + 1) / (g_i + g_j + 1) * (m / T_i)**(g_i + 1) * (m / T_j)**(g_j + 1) / m (no overflow).
    """
    g_i = np.asarray(gammas_a, dtype=np.float64).reshape(-1, 1)
    T_i = np.asarray(times_a, dtype=np.float64).reshape(-1, 1)
    g_j = np.asarray(gammas_b, dtype=np.float64).reshape(1, -1)
    T_j = np.asarray(times_b, dtype=np.float64).reshape(1, -1)
    m = np.minimum(T_i, T_j)
    return (g_i + 1) * (g_j + 1) / (g_i + g_j + 1) * (m / T_i) ** (g_i + 1) * (m / T_j) ** (g_j + 1) / m

def solve_coefficients(gammas, times, gamma_r, time_r):
    """Coefficients x minimising ||sum_i x_i p_i - p_r||, for stored profiles (gammas, times) and the target (gamma_r, time_r),
    scaled to sum to 1 (Algorithm 3 of the paper, as the EDM2 release solves it): the result is a weighted average of
    the stored weights, so that it keeps their scale (unscaled, sigma_rel 0.02 from 0.05/0.10 would shrink them by 3%).

    Returns (x, residual), residual = ||sum_i x_i p_i - p_r|| / ||p_r||, the relative L2 distance of the profiles.
    Times may count steps or images; they are divided by time_r, which leaves x unchanged.
    """
    times = np.asarray(times, dtype=np.float64) / time_r
    A = profile_inner_products(gammas, times, gammas, times)
    b = profile_inner_products(gammas, times, [gamma_r], [1.0])[:, 0]
    x = np.linalg.lstsq(A, b, rcond=None)[0] # A is ill-conditioned: SVD-based least squares
    x = x / np.sum(x) # a weighted average: sum_i x_i = 1
    p_r_sq = profile_inner_products([gamma_r], [1.0], [gamma_r], [1.0])[0, 0]
    residual = np.sqrt(max(x @ A @ x - 2 * (b @ x) + p_r_sq, 0) / p_r_sq)
    return x, float(residual)

#----------------------------------------------------------------------------
# Tracking during training (Section 3.1).

def _snapshot_copy(value):
    """A module as snapshots hold it: a faithful CPU copy in eval mode; other values as they are."""
    if not isinstance(value, torch.nn.Module):
        return value
    value = copy.deepcopy(value).eval().requires_grad_(False)
    set_fast_paths(value, False)
    return value.to(memory_format=torch.contiguous_format).cpu()

class PowerFunctionEMA:
    """Power-function EMAs of a network's weights, one per sigma_rel, saved as phema-NNNNNN-S.SSS.pkl."""

    def __init__(self,
        net,                        # The network being trained; the averages start as copies of it.
        stds,                       # Relative standard deviations sigma_rel to track, e.g. [0.050, 0.100].
        snapshot_kimg   = None,     # Save every this many kimg (an integer); None = whenever the loop saves a network snapshot.
        run_dir         = None,     # Where to save; None = never (the ranks other than 0).
        snapshot_data   = None,     # The rest of a network pickle: dict(loss_fn, augment_pipe, dataset_kwargs).
        resume_state    = None,     # Training state being resumed (its 'phema' entry), None = a new run.
    ):
        self.stds = [float(std) for std in stds]
        self.gammas = [sigma_rel_to_gamma(std) for std in self.stds]
        if snapshot_kimg is not None and (int(snapshot_kimg) != snapshot_kimg or snapshot_kimg < 1):
            raise ValueError(f'--phema-snap={snapshot_kimg}: the interval must be a whole number of kimg (the files are named by kimg)')
        self.snapshot_nimg = None if snapshot_kimg is None else int(snapshot_kimg) * 1000
        self.run_dir = run_dir
        self.snapshot_data = dict(snapshot_data or {})
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]
        self.saved_nimg = None
        if resume_state is not None and resume_state.get('phema') is not None:
            self.load_state_dict(resume_state['phema'])
        elif resume_state is not None:
            dist.print0('Note: the training state holds no power-function EMAs; they start from the resumed weights.')

    @torch.no_grad()
    def update(self, net, nimg, batch_size):
        """Average in the weights of the step that brings the run to `nimg` images; save when an interval ends."""
        params = [p.detach() for p in net.parameters()]
        buffers = list(net.buffers())
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_function_beta(gamma, nimg, batch_size)
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - beta) # theta_hat = beta theta_hat + (1 - beta) theta
            for b_ema, b_net in zip(ema.buffers(), buffers):
                b_ema.copy_(b_net)
        if self.snapshot_nimg is not None and nimg // self.snapshot_nimg > (nimg - batch_size) // self.snapshot_nimg:
            self.save(nimg)

    def snapshot(self, nimg, done, label=None):
        """The loop saves a network snapshot (named by `label`): save too, or only at the end when saving at an
        interval of our own."""
        if self.snapshot_nimg is None or (done and self.saved_nimg != nimg):
            self.save(nimg, label)

    def save(self, nimg, label=None):
        """Write phema-LABEL-S.SSS.pkl for each sigma_rel, each file atomically; LABEL is the kimg (NNNNNN) by default."""
        self.saved_nimg = nimg
        if self.run_dir is None:
            return
        rest = {key: _snapshot_copy(value) for key, value in self.snapshot_data.items()}
        for std, gamma, ema in zip(self.stds, self.gammas, self.emas):
            data = dict(ema=_snapshot_copy(ema), **rest, phema=dict(std=std, gamma=gamma, nimg=int(nimg)))
            with dnnlib.util.atomic_write(os.path.join(self.run_dir, snapshot_name(label or training_state.kimg_label(nimg // 1000 * 1000), std)), 'wb') as f:
                pickle.dump(data, f)

    def state_dict(self):
        return dict(stds=list(self.stds), emas=[{name: t.detach().cpu() for name, t in misc.named_params_and_buffers(ema)}
                                                for ema in self.emas])

    @torch.no_grad()
    def load_state_dict(self, state):
        stds = [float(std) for std in state['stds']]
        if stds != self.stds:
            raise ValueError(f'the training state tracks --phema={",".join(f"{s:.3f}" for s in stds)}, '
                             f'not --phema={",".join(f"{s:.3f}" for s in self.stds)}')
        for ema, tensors in zip(self.emas, state['emas']):
            for name, tensor in misc.named_params_and_buffers(ema):
                if name not in tensors:
                    raise ValueError(f'the training state\'s power-function EMA lacks {name}')
                tensor.copy_(tensors[name])

#----------------------------------------------------------------------------
# Reconstruction from a run directory.

def list_snapshots(run_dir):
    """[(kimg, path)] of the phema snapshots in a run directory, in order of kimg."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f'run directory not found: {run_dir}')
    found = sorted((training_state.label_kimg(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
                   for m in [SNAPSHOT_RE.fullmatch(name) or EDM2_SNAPSHOT_RE.fullmatch(name)] if m)
    if not found:
        raise ValueError(f'{run_dir} holds no phema-NNNNNN-S.SSS.pkl snapshots (train with --phema), '
                         f'nor the EDM2 release\'s network-snapshot-NNNNNNN-S.SSS.pkl')
    return found

def edm2_kimg_to_nimg(kimg):
    """The training time of an EDM2 release snapshot named by kimg = nimg // 1000: its runs save at multiples of 1024 images."""
    return (kimg * 1000 + 999) // 1024 * 1024

def _read_profile(path):
    """(gamma, nimg) recorded in a phema snapshot, or given by the name of an EDM2 release snapshot."""
    match = EDM2_SNAPSHOT_RE.fullmatch(os.path.basename(path))
    if match:
        return sigma_rel_to_gamma(float(match.group(2))), edm2_kimg_to_nimg(int(match.group(1)))
    info = network_io.load_network_data(path, verbose=False).get('phema')
    if not isinstance(info, dict) or 'gamma' not in info or 'nimg' not in info:
        raise ValueError(f'{path} records no power-function profile (its "phema" entry with gamma and nimg)')
    return float(info['gamma']), int(info['nimg'])

def reconstruct(run_dir, stds, at_kimg=None, verbose=True):
    """The power-function EMA of each sigma_rel in `stds` at the time of the run's phema snapshots of
    `at_kimg` (default: the last), as the least-squares combination of the phema snapshots up to then.

    Returns (nimg, [(std, data, residual)]): data a network pickle dict(ema, loss_fn, augment_pipe,
    dataset_kwargs), residual the relative L2 distance of its profile from the exact one. The snapshots
    are read twice (exponents and times, then weights): one network is in memory at a time.
    """
    snapshots = list_snapshots(run_dir)
    kimgs = sorted({kimg for kimg, _ in snapshots})
    at_kimg = kimgs[-1] if at_kimg is None else at_kimg
    if at_kimg not in kimgs:
        raise ValueError(f'--at={at_kimg:g}: {run_dir} has phema snapshots at kimg {", ".join(f"{kimg:g}" for kimg in kimgs)}')
    snapshots = [(kimg, path, *_read_profile(path)) for kimg, path in snapshots if kimg <= at_kimg]
    time_r = max(nimg for kimg, _, _, nimg in snapshots if kimg == at_kimg)
    snapshots = [s for s in snapshots if 0 < s[3] <= time_r] # (at time 0 a profile has no width)
    _, paths, gammas, times = zip(*snapshots)
    solutions = [solve_coefficients(gammas, times, sigma_rel_to_gamma(std), time_r) for std in stds]
    if verbose:
        print(f'Reconstructing from {len(paths)} phema snapshots up to {time_r} images...')

    # theta_r = sum_i x_i theta_i, accumulated in float64.
    sums = [dict() for _ in stds]
    shapes = template = None
    for i, path in enumerate(paths):
        data = network_io.load_network_data(path, verbose=False)
        params = dict(data['ema'].named_parameters())
        if shapes is None:
            shapes = {name: p.shape for name, p in params.items()}
        if {name: p.shape for name, p in params.items()} != shapes:
            raise ValueError(f'{path} holds a network with other parameters than {paths[0]}')
        for (x, _), acc in zip(solutions, sums):
            for name, param in params.items():
                acc[name] = acc.get(name, 0) + float(x[i]) * param.detach().to(torch.float64)
        if times[i] == time_r:
            template = data # the network, buffers and loss of the target time
        del data, params
    results = []
    for std, (_, residual), acc in zip(stds, solutions, sums):
        net = copy.deepcopy(template['ema'])
        with torch.no_grad():
            for name, param in net.named_parameters():
                param.copy_(acc[name].to(param.dtype))
        data = dict(ema=net, loss_fn=template.get('loss_fn'), augment_pipe=template.get('augment_pipe'),
                    dataset_kwargs=template.get('dataset_kwargs'))
        if template.get('encoder') is not None: # EDM2 snapshots: what decodes the network's output
            data['encoder'] = template['encoder']
        results.append((std, data, residual))
    return time_r, results

#----------------------------------------------------------------------------
