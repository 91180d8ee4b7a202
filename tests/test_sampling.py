"""Samplers against the reference outputs for an exact Gaussian denoiser
(tests/fixtures/samplers-gauss.npz) and against closed forms."""

import inspect
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT, fixture_file
from training import sampling, solvers
from training.sampling import edm_sampler, ablation_sampler, StackedRandomGenerator

SAMPLERS = {'edm': edm_sampler, 'ablation': ablation_sampler}

# What a user copies (README, "Generating images"): training/solvers.py whole, for edm_sampler and the fast
# solvers; for ablation_sampler, also its two helpers from training/sampling.py.
COPIED_PARTS = {
    'edm': [],
    'ablation': ['iddpm_sigma_table', 'default_sigma_range', 'ablation_sampler'],
}

#----------------------------------------------------------------------------

class GaussianDenoiser:
    """Exact denoiser for data ~ N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), in float64."""

    img_channels = 3
    img_resolution = 8
    label_dim = 0
    sigma_min = 0
    sigma_max = float('inf')

    def __init__(self, mu, s):
        self.mu = torch.as_tensor(mu, dtype=torch.float64) # Data mean [3, 8, 8].
        self.s = float(s)                                   # Data standard deviation.

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x.to(torch.float64) - self.mu)

@pytest.fixture(scope='module')
def gauss():
    return dict(np.load(fixture_file('samplers-gauss.npz')))

def _cases():
    # Case names are read from the fixture; when it is missing, the test fails in fixture_file().
    try:
        with np.load(os.path.join(FIXTURES, 'samplers-gauss.npz')) as data:
            return sorted({key.split('/')[0] for key in data.files if key.endswith('/kwargs')})
    except OSError:
        return ['edm-default']

def _pasted_samplers():
    """The samplers as pasted into a new file: training/solvers.py and the source text of COPIED_PARTS,
    run in a namespace holding only np and torch."""
    samplers = {}
    for name, parts in COPIED_PARTS.items():
        namespace = dict(np=np, torch=torch)
        exec(inspect.getsource(solvers), namespace)
        for part in parts:
            exec(inspect.getsource(getattr(sampling, part)), namespace)
        samplers[name] = namespace[f'{name}_sampler']
    return samplers

def _tolerance(gauss, case):
    # The VP schedule's float64 exp and pow differ by a few ULP between PyTorch releases (2.1 against
    # 2.13), and its sigma_inv, log(1 + sigma^2) at small sigma, amplifies them to about 1e-7 over 64 steps.
    return 1e-6 if json.loads(str(gauss[f'{case}/kwargs'])).get('schedule') == 'vp' else 1e-10

def _run_case(gauss, case, samplers=SAMPLERS):
    """Run the sampler of a fixture case with per-seed noise; returns (images, latents)."""
    kwargs = json.loads(str(gauss[f'{case}/kwargs']))
    sampler = samplers[kwargs.pop('sampler')]
    rnd = StackedRandomGenerator('cpu', gauss['seeds'])
    latents = rnd.randn([len(gauss['seeds']), 3, 8, 8])
    net = GaussianDenoiser(gauss['mu'], gauss['s'])
    return sampler(net, latents, None, randn_like=rnd.randn_like, **kwargs).numpy(), latents.numpy()

#----------------------------------------------------------------------------

@pytest.mark.parametrize('case', _cases())
def test_samplers_reproduce_the_reference(gauss, case):
    images, latents = _run_case(gauss, case)
    np.testing.assert_array_equal(latents, gauss[f'{case}/latents'])
    err = np.abs(images - gauss[f'{case}/images']).max()
    print(f'{case}: max |ours - reference| = {err:.3g}')
    assert err <= _tolerance(gauss, case)

@pytest.mark.parametrize('case', _cases())
def test_pasted_sampler_reproduces_reference(gauss, case):
    images, _ = _run_case(gauss, case, samplers=_pasted_samplers())
    assert np.abs(images - gauss[f'{case}/images']).max() <= _tolerance(gauss, case)
    np.testing.assert_array_equal(images, _run_case(gauss, case)[0])

def test_pasted_samplers_guide_as_ours():
    # Autoguidance, with and without an interval, and classifier-free guidance (labels and zeros in one batch).
    pasted = _pasted_samplers()
    net, latents, _ = _gauss_net_and_latents()
    guide = GaussianDenoiser(net.mu + 0.3, 0.8)
    labels = torch.eye(3)[torch.tensor([0, 2])]
    for name, sampler in SAMPLERS.items():
        for kwargs in [dict(gnet=guide, guidance=2), dict(gnet=guide, guidance=2.5, guidance_interval=(0.5, 10)), dict(guidance=3)]:
            images = pasted[name](net, latents, labels, num_steps=6, **kwargs)
            assert torch.equal(images, sampler(net, latents, labels, num_steps=6, **kwargs)), (name, kwargs)
            if 'gnet' in kwargs:
                assert not torch.equal(images, sampler(net, latents, labels, num_steps=6))

def test_readme_names_what_to_copy():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    assert all(f'`{part}`' in readme for parts in COPIED_PARTS.values() for part in parts + ['training/solvers.py'])

def test_stacked_generator_first_draws(gauss):
    # The fixture's randint follows the randn on the same generators (as labels follow latents in generate.py).
    seeds = gauss['seeds']
    rnd = StackedRandomGenerator('cpu', seeds)
    np.testing.assert_array_equal(rnd.randn([len(seeds), 1, 4, 4]).numpy(), gauss['stacked/randn_1x4x4'])
    np.testing.assert_array_equal(rnd.randint(10, size=[len(seeds)]).numpy(), gauss['stacked/randint_10'])

def test_stacked_generator_depends_only_on_seed():
    both = StackedRandomGenerator('cpu', [7, 2 ** 32 + 9]).randn([2, 3, 4, 4])
    alone = StackedRandomGenerator('cpu', [9]).randn([1, 3, 4, 4]) # seeds are taken modulo 2^32
    np.testing.assert_array_equal(both[1:].numpy(), alone.numpy())
    with pytest.raises(ValueError, match='number of seeds'):
        StackedRandomGenerator('cpu', [1, 2]).randn([3, 4])

def test_default_error_against_exact_solution(gauss):
    images, _ = _run_case(gauss, 'edm-default')
    ours = np.abs(images - gauss['edm-default/exact']).max()
    reference = np.abs(gauss['edm-default/images'] - gauss['edm-default/exact']).max()
    print(f'EDM sampler, 18 steps: max error against the exact ODE solution = {ours:.6g} (reference sampler: {reference:.6g})')
    assert abs(ours - reference) <= 1e-10

def test_more_steps_converge_to_exact_solution(gauss):
    # Same seeds, same latents and sigma_max = 80, so the exact solution is shared; Heun is second order.
    err_18 = np.abs(_run_case(gauss, 'edm-default')[0] - gauss['edm-default/exact']).max()
    err_40 = np.abs(_run_case(gauss, 'edm-40')[0] - gauss['edm-default/exact']).max()
    assert err_40 < err_18 / 2

#----------------------------------------------------------------------------

def _gauss_net_and_latents(seeds=(0, 1)):
    mu = torch.linspace(-0.8, 0.8, 192, dtype=torch.float64).reshape(3, 8, 8)
    rnd = StackedRandomGenerator('cpu', seeds)
    return GaussianDenoiser(mu, 0.5), rnd.randn([len(seeds), 3, 8, 8]), rnd

@pytest.mark.parametrize('discretization', ['vp', 've', 'iddpm', 'edm'])
def test_single_step_is_one_euler_step_to_zero(discretization):
    # One Euler step from sigma_0 to 0 lands on D(x_0; sigma_0) exactly (linear schedule, no scaling).
    net, latents, _ = _gauss_net_and_latents()
    images = ablation_sampler(net, latents, num_steps=1, discretization=discretization)
    assert torch.isfinite(images).all()
    sigma_0 = {'vp': math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), 've': 100, 'iddpm': None, 'edm': 80}[discretization] # default sigma_max
    if sigma_0 is not None:
        torch.testing.assert_close(images, net(latents.double() * sigma_0, sigma_0), rtol=0, atol=1e-10)
    for schedule, scaling in [('vp', 'vp'), ('ve', 'none')]:
        assert torch.isfinite(ablation_sampler(net, latents, num_steps=1, discretization=discretization, schedule=schedule, scaling=scaling)).all()

def test_single_step_edm_sampler():
    net, latents, _ = _gauss_net_and_latents()
    images = edm_sampler(net, latents, num_steps=1)
    torch.testing.assert_close(images, net(latents.double() * 80, 80), rtol=0, atol=1e-12)

def test_ablation_with_edm_choices_is_algorithm_2():
    # Heun + EDM discretization + sigma(t) = t + s(t) = 1 is the EDM sampler, churn included.
    churn = dict(num_steps=12, S_churn=30, S_min=0.05, S_max=50, S_noise=1.003)
    net, latents, rnd = _gauss_net_and_latents()
    expected = edm_sampler(net, latents, randn_like=rnd.randn_like, **churn)
    net, latents, rnd = _gauss_net_and_latents()
    images = ablation_sampler(net, latents, randn_like=rnd.randn_like, sigma_min=0.002, sigma_max=80, **churn)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-12)

@pytest.mark.parametrize('sampler', ['edm', 'ablation'])
@pytest.mark.parametrize('S_churn', [0, 30])
def test_churn_draws_noise_at_every_step(sampler, S_churn):
    # With churn, randn_like is called once per step, also outside [S_min, S_max], so the per-seed noise stream
    # stays aligned. Without, edm_sampler draws nothing; ablation_sampler still draws (see its comment).
    net, latents, rnd = _gauss_net_and_latents()
    calls = []
    randn_like = lambda x: calls.append(1) or rnd.randn_like(x)
    SAMPLERS[sampler](net, latents, randn_like=randn_like, num_steps=5, S_churn=S_churn, S_min=0.5, S_max=5)
    assert len(calls) == (0 if sampler == 'edm' and S_churn == 0 else 5)

def test_edm_sampler_without_churn_equals_unused_draws():
    # gamma = 0 at every step whether S_churn = 0 (nothing drawn) or the churn window holds no step (drawn,
    # multiplied by zero): the same images to the bit.
    net, latents, rnd = _gauss_net_and_latents()
    no_churn = edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=7)
    unused = edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=7, S_churn=40, S_min=100, S_max=200)
    assert torch.equal(no_churn, unused)
    assert not torch.equal(no_churn, edm_sampler(net, latents, randn_like=rnd.randn_like, num_steps=7, S_churn=40))

def test_invalid_arguments_raise_value_error():
    net, latents, _ = _gauss_net_and_latents()
    with pytest.raises(ValueError, match='num_steps'):
        edm_sampler(net, latents, num_steps=0)
    with pytest.raises(ValueError, match='num_steps'):
        ablation_sampler(net, latents, num_steps=0)
    with pytest.raises(ValueError, match='solver'):
        ablation_sampler(net, latents, solver='rk4')

#----------------------------------------------------------------------------
