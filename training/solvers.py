"""Deterministic samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022) for any denoiser D: EDM's Algorithm 2 and the low-step solvers
compared by diff-sampler (Zhou et al. 2024, `diff-solvers-main`), with its time schedules.

Every sampler has edm_sampler's call shape (net, latents, class_labels, randn_like,
num_steps, sigma_min, sigma_max, ..., gnet, guidance, guidance_interval) and works in
float64. `num_steps` counts the noise levels t_0 > ... > t_{N-1}; the fast solvers take
N - 1 steps from t_0 = sigma_max to t_{N-1} = sigma_min (and, with denoise_to_zero, one
more evaluation that returns D(x; sigma_min)); `sigmas` gives the levels directly.
This file needs torch and numpy only: copy it whole into other code."""

import numpy as np
import torch

#----------------------------------------------------------------------------
# Time schedules.

def _step_fractions(num_steps, device=None):
    """i / (N - 1) for i = 0..N-1 in float64; a single step (N = 1) is at fraction 0, i.e. sigma_max."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    return step_indices / max(num_steps - 1, 1)

def edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=None):
    """EDM time steps, eq. 5 of Karras et al. 2022: sigma_max .. sigma_min spaced uniformly in sigma^(1/rho)."""
    fractions = _step_fractions(num_steps, device)
    ratio = (sigma_min / sigma_max) ** (1 / rho)
    if ratio >= 1e-8: # the reference's form
        return (sigma_max ** (1 / rho) + fractions * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    # A small rho (below about 0.57 for 0.002 .. 80) takes sigma^(1/rho) out of float64's range: the same steps
    # with sigma_max factored out, sigma_max ((1 - i/(N-1)) + i/(N-1) (sigma_min/sigma_max)^(1/rho))^rho.
    return (sigma_max * ((1 - fractions) + fractions * ratio) ** rho).clamp(min=sigma_min)

def vp_sigma(t, beta_d, beta_min):
    """VP noise level sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1); t a float or a tensor."""
    return (np.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5

def vp_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """(beta_d, beta_min) of the VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    return beta_d, np.log(sigma_max ** 2 + 1) - 0.5 * beta_d

SCHEDULES = ('polynomial', 'logsnr', 'time_uniform')

def sigma_steps(num_steps, sigma_min=0.002, sigma_max=80, schedule='polynomial', rho=7, device=None):
    """N noise levels from sigma_max down to sigma_min: 'polynomial' (EDM's, eq. 5), 'logsnr' (uniform in
    log sigma) or 'time_uniform' (DPM-Solver's: uniform in t^(1/rho) of the VP schedule through both ends)."""
    _check_choice('schedule', schedule, SCHEDULES)
    if schedule == 'polynomial':
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=device)
    fractions = _step_fractions(num_steps, device)
    if schedule == 'logsnr':
        return (np.log(sigma_max) + fractions * (np.log(sigma_min) - np.log(sigma_max))).exp()
    epsilon_s = 1e-3
    t = (1 + fractions * (epsilon_s ** (1 / rho) - 1)) ** rho
    return vp_sigma(t, *vp_betas(sigma_min, sigma_max, epsilon_s))

#----------------------------------------------------------------------------
# Checks and pieces shared by the samplers.

def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(map(str, choices))}')

def _check_num_steps(num_steps, least=1):
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < least:
        raise ValueError(f'num_steps must be an integer of at least {least}, got {num_steps!r}')

def check_sigmas(sigmas):
    """Raise ValueError unless `sigmas` is a list of at least two finite, positive, strictly decreasing noise levels."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2 or not all(np.isfinite(s) and s > 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f'sigmas must be at least two finite, positive, strictly decreasing noise levels, got {sigmas}')
    return sigmas

def guided_denoiser(net, class_labels, gnet=None, guidance=1, guidance_interval=None):
    """The denoiser D(x, sigma[, sigma_host]) that the samplers step with: net (D1) alone for guidance = 1,
    else D0 + w (D1 - D0) for sigma in (lo, hi] of guidance_interval (Kynkaanniemi et al. 2024) and D1 outside.
    D0 is gnet (autoguidance, Karras et al. 2024) or, when gnet is None, net given the zero label vector
    (classifier-free guidance, Ho & Salimans 2022), evaluated in one batch with D1. sigma_host, when given,
    is float(sigma) already on the host."""
    if not np.isfinite(guidance):
        raise ValueError(f'guidance must be a finite number, got {guidance!r}')
    if gnet is None and guidance != 1 and class_labels is None:
        raise ValueError('classifier-free guidance needs class labels; give gnet to guide an unconditional network')
    sigma_lo, sigma_hi = (0, float('inf')) if guidance_interval is None else guidance_interval

    def denoise(x, sigma, sigma_host=None):
        if guidance == 1 or not sigma_lo < (float(sigma) if sigma_host is None else sigma_host) <= sigma_hi:
            return net(x, sigma, class_labels).to(torch.float64)
        if gnet is None: # classifier-free: D0 is net given the zero label vector, in the same batch
            D1, D0 = net(torch.cat([x, x]), sigma, torch.cat([class_labels, torch.zeros_like(class_labels)])).to(torch.float64).chunk(2)
        else:
            D1, D0 = net(x, sigma, class_labels).to(torch.float64), gnet(x, sigma, class_labels).to(torch.float64)
        return D0 + guidance * (D1 - D0)
    return denoise

def _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval):
    """(denoise, t_steps, t_host) of a fast solver: the guided denoiser, the noise levels in float64 (`sigmas`
    as given, else the schedule over the network's range) and the same levels as floats on the host."""
    denoise = guided_denoiser(net, class_labels, gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)
    if sigmas is not None:
        t_host = check_sigmas(sigmas)
    else:
        _check_num_steps(num_steps, least=2)
        sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0)) # within the network's range, if it states one
        sigma_max = min(sigma_max, getattr(net, 'sigma_max', float('inf')))
        t_host = sigma_steps(num_steps, sigma_min, sigma_max, schedule, rho).tolist()
    return denoise, torch.tensor(t_host, dtype=torch.float64, device=latents.device), t_host

def _direction(denoise, x, t, t_host, afs):
    """(d, D): dx/dsigma = (x - D(x; t)) / t and the denoised D; with afs (the analytical first step of
    Zhou et al. 2024) no evaluation: d = x / sqrt(1 + t^2), the direction for data of mean 0 and variance 1."""
    if afs:
        d = x / (1 + t ** 2).sqrt()
        return d, x - t * d
    denoised = denoise(x, t, t_host)
    return (x - denoised) / t, denoised

def _finish(denoise, x, t_steps, t_host, denoise_to_zero):
    """The sample at t_{N-1} = sigma_min, or with denoise_to_zero D(x; sigma_min): one more evaluation."""
    return denoise(x, t_steps[-1], t_host[-1]) if denoise_to_zero else x

def _check_order(solver, max_order):
    _check_choice(f'max_order of {solver}', max_order, ORDERS[solver])

def dynamic_thresholding(x0, p=0.995):
    """Clamp each sample to its p-quantile of |x0| (at least 1) and divide by it (Saharia et al. 2022), as DPM-Solver++ does."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), p, dim=1).clamp(min=1).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s

#----------------------------------------------------------------------------
# EDM's sampler.

def edm_sampler(
    net,                            # Denoiser D(x, sigma, class_labels) with sigma_min, sigma_max, round_sigma().
    latents,                        # Initial noise [N, C, H, W] drawn from N(0, I).
    class_labels    = None,         # One-hot labels [N, label_dim], or None.
    randn_like      = torch.randn_like, # Noise source for the churn; called once per step when S_churn > 0.
    num_steps       = 18,           # N; N = 1 is a single Euler step from sigma_max to 0.
    sigma_min       = 0.002,        # Lowest noise level (clamped to the network's range).
    sigma_max       = 80,           # Highest noise level (clamped to the network's range).
    rho             = 7,            # Time step exponent.
    S_churn         = 0,            # Stochasticity strength.
    S_min           = 0,            # Churn only where S_min <= t_i <= S_max.
    S_max           = float('inf'),
    S_noise         = 1,            # Noise inflation of the churn.
    gnet            = None,         # Guiding denoiser D0 (autoguidance); None: net without class labels (classifier-free).
    guidance        = 1,            # Guidance weight w: D0 + w (D1 - D0); 1 = no guidance.
    guidance_interval = None,       # Guide only for sigma in (lo, hi]; None: at every noise level.
):
    """EDM sampler: Algorithm 2 of Karras et al. 2022 (stochastic Heun, 2N - 1 evaluations), optionally guided."""
    _check_num_steps(num_steps)
    denoise = guided_denoiser(net, class_labels, gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)

    # Time step discretization (eq. 5), within the network's range; t_N = 0.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    t_host = t_steps.tolist() # read back once, so that the churn window test never waits for the device

    # Main sampling loop.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily (drawn at every step when S_churn > 0, to keep the noise stream per seed).
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_host[i] <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur) if S_churn > 0 else x_cur

        # Euler step.
        d_cur = (x_hat - denoise(x_hat, t_hat, t_host[i] if gamma == 0 else None)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Apply 2nd order correction.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next, t_host[i + 1])) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next

#----------------------------------------------------------------------------
# Single-step solvers: Euler, Heun, DPM-Solver-2.

def euler_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                  schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None):
    """Euler's method (DDIM, Song et al. 2021): N - 1 evaluations."""
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        x_next = x_cur + (t_next - t_cur) * d_cur
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

def heun_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                 schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None):
    """Heun's method (Karras et al. 2022) on every step, the last one too: 2 (N - 1) evaluations."""
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        x_next = x_cur + (t_next - t_cur) * d_cur
        d_prime = (x_next - denoise(x_next, t_next, t_host[i + 1])) / t_next
        x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

def dpm_2_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                  schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None, r=0.5):
    """DPM-Solver-2 (Lu et al. 2022) as a midpoint method at t_i^(1-r) t_{i+1}^r: 2 (N - 1) evaluations."""
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        t_mid = (t_next ** r) * (t_cur ** (1 - r))
        x_mid = x_cur + (t_mid - t_cur) * d_cur
        d_mid = (x_mid - denoise(x_mid, t_mid, t_host[i + 1] ** r * t_host[i] ** (1 - r))) / t_mid
        x_next = x_cur + (t_next - t_cur) * ((1 / (2 * r)) * d_mid + (1 - 1 / (2 * r)) * d_cur)
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

#----------------------------------------------------------------------------
# Linear multistep solvers on d = dx/dsigma: iPNDM, its variable-step form, DEIS.

ADAMS_BASHFORTH = {1: ([1], 1), 2: ([3, -1], 2), 3: ([23, -16, 5], 12), 4: ([55, -59, 37, -9], 24)} # (weights of d_i, d_{i-1}, ...), divisor

def ipndm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                  schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None, max_order=4):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth of order min(i + 1, max_order) with fixed weights: N - 1 evaluations."""
    _check_order('ipndm', max_order)
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    d_prev = [] # d_{i-1}, d_{i-2}, ... (at most max_order - 1)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        weights, divisor = ADAMS_BASHFORTH[min(max_order, i + 1)]
        x_next = x_cur + (t_next - t_cur) * sum(w * d for w, d in zip(weights, [d_cur] + d_prev)) / divisor
        d_prev = ([d_cur] + d_prev)[:max_order - 1]
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

def _variable_adams_bashforth(h):
    """Weights of d_i, d_{i-1}, ... for the step h[0] = t_{i+1} - t_i after h[1] = t_i - t_{i-1}, h[2], ... (iPNDM_v)."""
    if len(h) == 1:
        return [1]
    h_n, h_n_1 = h[0], h[1]
    weights = [(2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2]
    if len(h) == 2:
        return weights
    h_n_2 = h[2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if len(h) == 3:
        return [weights[0] + temp1, weights[1] - (1 + h_n_1 / h_n_2) * temp1, temp1 * h_n_1 / h_n_2]
    h_n_3 = h[3]
    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return [weights[0] + temp1 + temp2,
            weights[1] - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + ratio) * temp2,
            temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + ratio * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * ratio * h_n_1 / h_n_2]

def ipndm_v_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                    schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None, max_order=4):
    """iPNDM with variable steps: Adams-Bashforth weights for unequal spacings (diff-sampler's ipndm_v): N - 1 evaluations."""
    _check_order('ipndm_v', max_order)
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    d_prev = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        order = min(max_order, i + 1)
        weights = _variable_adams_bashforth([t_steps[i + 1 - k] - t_steps[i - k] for k in range(order)])
        x_next = x_cur + (t_next - t_cur) * sum(w * d for w, d in zip(weights, [d_cur] + d_prev))
        d_prev = ([d_cur] + d_prev)[:max_order - 1]
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

def deis_tab_coefficients(t_steps, max_order, num_points=10000):
    """DEIS 'tAB' (Zhang & Chen 2023) weights per step: the integral over the step of dsigma/dt times the Lagrange
    polynomials through the last min(i + 1, max_order) points, in the time t of the VP schedule fitted to
    0.002 .. 80 (as diff-sampler fits it, whatever the range), by a sum over num_points; [] for an Euler step."""
    beta_d, beta_min = vp_betas(0.002, 80)
    beta_0, beta_1 = beta_min, beta_d + beta_min
    t_vp = ((beta_min ** 2 + 2 * beta_d * (t_steps.cpu() ** 2 + 1).log()).sqrt() - beta_min) / beta_d # inverse of vp_sigma
    coefficients = []
    for i in range(len(t_vp) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(float(t_vp[i]), float(t_vp[i + 1]), num_points, dtype=torch.float64)
        dtau = (t_vp[i + 1] - t_vp[i]) / num_points
        alpha = (-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0).exp() # alpha_bar(t) = 1 / (1 + sigma(t)^2)
        dsigma_dt = 0.5 * (taus * (beta_1 - beta_0) + beta_0) / (alpha * (1 - alpha)).sqrt()
        points = [t_vp[i - k] for k in range(order)]
        row = []
        for j in range(order): # Lagrange polynomial of points[j]
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - points[k]) / (points[j] - points[k]))
            row.append(float((dsigma_dt * poly).sum() * dtau))
        coefficients.append(row)
    return coefficients

def deis_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                 schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None, max_order=4):
    """DEIS with its 'tAB' coefficients (Zhang & Chen 2023): N - 1 evaluations."""
    _check_order('deis', max_order)
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    coefficients = deis_tab_coefficients(t_steps, max_order)
    x_next = latents.to(torch.float64) * t_steps[0]
    d_prev = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur, _ = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        if coefficients[i]:
            x_next = x_cur + sum(c * d for c, d in zip(coefficients[i], [d_cur] + d_prev))
        else:
            x_next = x_cur + (t_next - t_cur) * d_cur
        d_prev = ([d_cur] + d_prev)[:max_order - 1]
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

#----------------------------------------------------------------------------
# Exponential integrators on the thresholded data prediction, in lambda = -log(sigma): DPM-Solver++, UniPC.

def dpm_pp_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                   schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None,
                   max_order=3, lower_order_final=True):
    """Multistep DPM-Solver++ (Lu et al. 2022), data prediction with dynamic thresholding: N - 1 evaluations."""
    _check_order('dpm_pp', max_order)
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    x_next = latents.to(torch.float64) * t_steps[0]
    D, t = [], [] # thresholded data predictions D_i, D_{i-1}, D_{i-2} and their noise levels
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        _, denoised = _direction(denoise, x_cur, t_cur, t_host[i], afs and i == 0)
        D, t = [dynamic_thresholding(denoised)] + D[:2], [t_cur] + t[:2]
        order = min(max_order, i + 1)
        if lower_order_final and i + 1 >= max_order:
            order = min(max_order, len(t_steps) - (i + 1))
        h = -t_next.log() + t_cur.log() # lambda_{i+1} - lambda_i
        phi_1 = torch.expm1(-h)
        x_next = (t_next / t_cur) * x_cur - phi_1 * D[0]
        if order == 2:
            r0 = (-t[0].log() + t[1].log()) / h
            x_next = x_next - 0.5 * phi_1 * (1 / r0) * (D[0] - D[1])
        elif order == 3:
            r0, r1 = (-t[0].log() + t[1].log()) / h, (-t[1].log() + t[2].log()) / h
            D1_0, D1_1 = (1 / r0) * (D[0] - D[1]), (1 / r1) * (D[1] - D[2])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
            phi_2 = phi_1 / h + 1
            phi_3 = phi_2 / h - 0.5
            x_next = x_next + phi_2 * D1 - phi_3 * D2
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

def _unipc_step(denoise, x, D, t, t_next, t_next_host, order, variant, use_corrector):
    """One UniPC step (Zhao et al. 2023, data prediction) from t[0] to t_next with the data predictions D[k] at t[k]
    (newest first): the predictor UniP of the given order, then, with use_corrector, an evaluation at t_next and the
    corrector UniC. Returns (x_next, thresholded D(x_next; t_next) or None)."""
    h = -t_next.log() + t[0].log()
    rks = [(-t[k].log() + t[0].log()) / h for k in range(1, order)] + [torch.ones_like(h)]
    D1s = [(D[k] - D[0]) / rks[k - 1] for k in range(1, order)]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    B_h = hh if variant == 'bh1' else torch.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.stack([torch.stack(rks) ** (k - 1) for k in range(1, order + 1)])
    b = torch.stack(b)
    x_base = t_next / t[0] * x - h_phi_1 * D[0]

    # Predictor.
    x_next = x_base
    if D1s:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_next = x_base - B_h * sum(rho * D1 for rho, D1 in zip(rhos_p, D1s))
    if not use_corrector:
        return x_next, None

    # Corrector, with the evaluation at t_next.
    D_next = dynamic_thresholding(denoise(x_next, t_next, t_next_host))
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, b)
    correction = sum(rho * D1 for rho, D1 in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (D_next - D[0])
    return x_base - B_h * correction, D_next

def unipc_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002, sigma_max=80,
                  schedule='polynomial', rho=7, sigmas=None, afs=False, denoise_to_zero=False, gnet=None, guidance=1, guidance_interval=None,
                  max_order=3, lower_order_final=True, variant='bh2'):
    """UniPC (Zhao et al. 2023), predictor-corrector with B(h) = h ('bh1') or e^h - 1 ('bh2'), data prediction with
    dynamic thresholding: one evaluation at t_0 and one per step but the last (N - 1; N when N - 1 < max_order)."""
    _check_order('unipc', max_order)
    _check_choice('variant', variant, ('bh1', 'bh2'))
    denoise, t_steps, t_host = _prepare(net, latents, class_labels, num_steps, sigma_min, sigma_max, schedule, rho, sigmas, gnet, guidance, guidance_interval)
    num_points = len(t_steps)
    x_next = latents.to(torch.float64) * t_steps[0]
    _, denoised = _direction(denoise, x_next, t_steps[0], t_host[0], afs)
    D, t = [dynamic_thresholding(denoised)], [t_steps[0]] # newest first, at most max_order
    for i, t_next in enumerate(t_steps[1:]):
        x_cur = x_next
        if i + 1 < max_order: # warming up: order i + 1, always corrected
            order, use_corrector = i + 1, True
        else:
            order = min(max_order, num_points - i - 1) if lower_order_final else max_order
            use_corrector = i != num_points - 2
        x_next, D_next = _unipc_step(denoise, x_cur, D, t, t_next, t_host[i + 1], order, variant, use_corrector)
        D, t = ([D_next] + D)[:max_order], ([t_next] + t)[:max_order]
    return _finish(denoise, x_next, t_steps, t_host, denoise_to_zero)

#----------------------------------------------------------------------------
# Registry.

SOLVERS = {'euler': euler_sampler, 'heun': heun_sampler, 'dpm_2': dpm_2_sampler, 'ipndm': ipndm_sampler, 'ipndm_v': ipndm_v_sampler,
           'deis': deis_sampler, 'dpm_pp': dpm_pp_sampler, 'unipc': unipc_sampler}
ORDERS = {'ipndm': (2, 3, 4), 'ipndm_v': (2, 3, 4), 'deis': (2, 3, 4), 'dpm_pp': (1, 2, 3), 'unipc': (1, 2, 3)} # max_order choices

def num_evaluations(solver, num_steps, max_order=None, afs=False, denoise_to_zero=False):
    """Network evaluations per image (a guided step counts once) of a solver with num_steps noise levels."""
    if solver == 'edm':
        return 2 * num_steps - 1
    _check_choice('solver', solver, SOLVERS)
    steps = num_steps - 1
    if solver == 'unipc':
        max_order = 3 if max_order is None else max_order
        evaluations = 1 + steps - (steps >= max_order) # no corrector on the last step after the warm-up
    else:
        evaluations = steps * (2 if solver in ('heun', 'dpm_2') else 1)
    return evaluations - bool(afs) + bool(denoise_to_zero)

#----------------------------------------------------------------------------
