"""Samplers of Karras et al. 2022: the generalised ablation sampler (Section 3)
beside the EDM sampler and the fast solvers of training/solvers.py, and
per-seed random numbers."""

import numpy as np
import torch

from training.solvers import _check_choice, _check_num_steps, _step_fractions, edm_sampler, edm_sigma_steps, guided_denoiser, vp_betas, vp_sigma # pylint: disable=unused-import

#----------------------------------------------------------------------------
# Noise levels of the ablation sampler (the EDM steps, vp_sigma and the checks are in training/solvers.py).

def iddpm_sigma_table(M, C_1, C_2, device=None):
    """The improved-DDPM noise levels u[0..M] (u[M] = 0, decreasing in j) in float64."""
    # alpha_bar(j) in float32 as the reference computes it (about 1e-7 from float64), u in float64.
    j = torch.arange(M + 1, dtype=torch.float32)
    alpha_bar = (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    ratios = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1).tolist() # alpha_bar(j-1) / alpha_bar(j) at index j-1
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1): # M, ..., 1
        u[j - 1] = float(np.sqrt((u[j] ** 2 + 1) / ratios[j - 1] - 1))
    return torch.tensor(u, dtype=torch.float64, device=device)

def default_sigma_range(discretization='edm', epsilon_s=1e-3):
    """(sigma_min, sigma_max) that the samplers use when none is given: those of the discretization (Table 1)."""
    _check_choice('discretization', discretization, ['vp', 've', 'iddpm', 'edm'])
    return {'vp': (vp_sigma(epsilon_s, beta_d=19.9, beta_min=0.1), vp_sigma(1, beta_d=19.9, beta_min=0.1)),
            've': (0.02, 100), 'iddpm': (0.002, 81), 'edm': (0.002, 80)}[discretization]

#----------------------------------------------------------------------------

def ablation_sampler(
    net,                            # Denoiser D(x, sigma, class_labels) with sigma_min, sigma_max, round_sigma().
    latents,                        # Initial noise [N, C, H, W] drawn from N(0, I).
    class_labels    = None,         # One-hot labels [N, label_dim], or None.
    randn_like      = torch.randn_like, # Noise source for the churn; called once per step.
    num_steps       = 18,           # N; N = 1 is a single Euler step from the highest level to 0.
    sigma_min       = None,         # Lowest noise level; None = the discretization's default.
    sigma_max       = None,         # Highest noise level; None = the discretization's default.
    rho             = 7,            # Time step exponent of the 'edm' discretization.
    solver          = 'heun',       # 'euler' | 'heun'.
    discretization  = 'edm',        # 'vp' | 've' | 'iddpm' | 'edm'.
    schedule        = 'linear',     # sigma(t): 'vp' | 've' | 'linear'.
    scaling         = 'none',       # s(t): 'vp' | 'none'.
    epsilon_s       = 1e-3,         # Lowest t of the VP discretization.
    C_1             = 0.001,        # iDDPM: clipping of alpha_bar ratios.
    C_2             = 0.008,        # iDDPM: cosine schedule offset.
    M               = 1000,         # iDDPM: number of original time steps.
    alpha           = 1,            # Position of the second evaluation (1 = Heun).
    S_churn         = 0,            # Stochasticity strength.
    S_min           = 0,            # Churn only where S_min <= sigma(t_i) <= S_max.
    S_max           = float('inf'),
    S_noise         = 1,            # Noise inflation of the churn.
    gnet            = None,         # Guiding denoiser D0 (autoguidance); None: net without class labels (classifier-free).
    guidance        = 1,            # Guidance weight w: D0 + w (D1 - D0); 1 = no guidance.
    guidance_interval = None,       # Guide only for sigma in (lo, hi]; None: at every noise level.
):
    """Generalised sampler of Section 3 of Karras et al. 2022 (Table 1: VP, VE, iDDPM and EDM choices),
    optionally guided as edm_sampler. To copy it, take training/solvers.py with iddpm_sigma_table and
    default_sigma_range (numpy as np and torch only)."""
    _check_num_steps(num_steps)
    denoise = guided_denoiser(net, class_labels, gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)
    _check_choice('solver', solver, ['euler', 'heun'])
    _check_choice('discretization', discretization, ['vp', 've', 'iddpm', 'edm'])
    _check_choice('schedule', schedule, ['vp', 've', 'linear'])
    _check_choice('scaling', scaling, ['vp', 'none'])
    device = latents.device

    # Default noise level range of the discretization, then the network's range.
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(default_max if sigma_max is None else sigma_max, net.sigma_max)

    # VP betas refitted so that sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max.
    vp_beta_d, vp_beta_min = vp_betas(sigma_min, sigma_max, epsilon_s)

    # Noise levels of the discretization.
    if discretization == 'vp':
        orig_t_steps = 1 + _step_fractions(num_steps, device) * (epsilon_s - 1)
        sigma_steps = vp_sigma(orig_t_steps, vp_beta_d, vp_beta_min)
    elif discretization == 've':
        orig_t_steps = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** _step_fractions(num_steps, device))
        sigma_steps = orig_t_steps.sqrt()
    elif discretization == 'iddpm':
        u = iddpm_sigma_table(M, C_1, C_2, device=device)
        u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(u_filtered) == 0:
            raise ValueError(f'no noise level of the iDDPM discretization lies between sigma_min={sigma_min:g} and sigma_max={sigma_max:g}')
        step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
        sigma_steps = u_filtered[((len(u_filtered) - 1) / max(num_steps - 1, 1) * step_indices).round().to(torch.int64)]
    else:
        sigma_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)

    # Noise level schedule sigma(t), its derivative and inverse.
    if schedule == 'vp':
        sigma = lambda t: vp_sigma(t, vp_beta_d, vp_beta_min)
        sigma_deriv = lambda t: 0.5 * (vp_beta_min + vp_beta_d * t) * (sigma(t) + 1 / sigma(t))
        sigma_inv = lambda sig: ((vp_beta_min ** 2 + 2 * vp_beta_d * (sig ** 2 + 1).log()).sqrt() - vp_beta_min) / vp_beta_d
    elif schedule == 've':
        sigma = lambda t: t.sqrt()
        sigma_deriv = lambda t: 0.5 / t.sqrt()
        sigma_inv = lambda sig: sig ** 2
    else:
        sigma = lambda t: t
        sigma_deriv = lambda t: 1
        sigma_inv = lambda sig: sig

    # Scaling schedule s(t) and its derivative.
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    else:
        s = lambda t: 1
        s_deriv = lambda t: 0

    # ODE direction dx/dt at (x, t), given the denoised image D.
    dxdt = lambda x, t, D: (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * D

    # Time steps from the rounded noise levels; t_N = 0.
    t_steps = sigma_inv(net.round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])

    sigma_host = sigma(t_steps).tolist() # read back once, so that the churn window test never waits for the device

    # Main sampling loop.
    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily; randn_like is drawn at every step, also without churn: with the VP schedule,
        # t_hat = sigma_inv(sigma(t_i)) can differ from t_i by round-off, and then even gamma = 0 adds a trace of it.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma_host[i] <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur)

        # Euler step.
        h = t_next - t_hat
        denoised = denoise(x_hat / s(t_hat), sigma(t_hat))
        d_cur = dxdt(x_hat, t_hat, denoised)

        # Second order correction at t_hat + alpha h, except on the last step (t_N = 0).
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            x_prime = x_hat + alpha * h * d_cur
            t_prime = t_hat + alpha * h
            denoised = denoise(x_prime / s(t_prime), sigma(t_prime))
            d_prime = dxdt(x_prime, t_prime, denoised)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)

    return x_next

#----------------------------------------------------------------------------

class StackedRandomGenerator:
    """Per-seed random numbers: one torch.Generator per image, so an image depends only on its seed."""

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check_size(self, size):
        if size[0] != len(self.generators):
            raise ValueError(f'size {list(size)} does not match the number of seeds ({len(self.generators)})')

    def randn(self, size, **kwargs):
        """Stacked torch.randn(size[1:]), one draw per seed."""
        self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        """randn with the shape, dtype, layout and device of `input`."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        """Stacked torch.randint(*args, size=size[1:]), one draw per seed."""
        self._check_size(size)
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def latents_and_labels(net, rnd, device, class_idx=None):
    """(latents, class_labels) for the seeds of `rnd`, as generate.py draws them: the initial noise [N, C, H, W],
    then one-hot labels [N, label_dim] (None for an unconditional network); class_idx overrides the drawn labels."""
    batch_size = len(rnd.generators)
    latents = rnd.randn([batch_size, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[batch_size], device=device)]
    if class_idx is not None:
        class_labels[:, :] = 0
        class_labels[:, class_idx] = 1
    return latents, class_labels

#----------------------------------------------------------------------------
