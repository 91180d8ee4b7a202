"""The low-step solvers of training/solvers.py against the published code's outputs on an exact
Gaussian-mixture denoiser (tests/fixtures/solvers-gmm.npz), its probability-flow ODE solution,
and invariants: evaluation counts, guidance, batch size."""

import inspect
import json

import numpy as np
import pytest
import torch

from conftest import single_thread

from conftest import fixture_file

pytestmark = pytest.mark.usefixtures('one_thread')
one_thread = pytest.fixture(single_thread)
from training import solvers
from training.solvers import SOLVERS, ORDERS, num_evaluations, sigma_steps

#----------------------------------------------------------------------------

class MixtureDenoiser:
    """Exact denoiser of a mixture of Gaussians N(mu_k, s_k^2 I) with weights pi_k, in float64:
    D(x; sigma) = sum_k p(k | x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))."""

    sigma_min = 0
    sigma_max = float('inf')

    def __init__(self, mu, s, logpi):
        self.mu, self.s, self.logpi = (torch.as_tensor(v, dtype=torch.float64) for v in (mu, s, logpi)) # [K, D], [K], [K]
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        x = x.to(torch.float64)
        flat = x.reshape(len(x), 1, -1) # [N, 1, D]
        var = self.s ** 2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2 # [K]
        log_p = self.logpi - 0.5 * ((flat - self.mu) ** 2).sum(-1) / var - 0.5 * flat.shape[-1] * var.log()
        posterior_means = self.mu + (self.s ** 2 / var)[:, None] * (flat - self.mu)
        return (log_p.softmax(-1)[..., None] * posterior_means).sum(1).reshape(x.shape)

@pytest.fixture(scope='module')
def gmm():
    with np.load(fixture_file('solvers-gmm.npz')) as data:
        d = dict(data)
    d['cases'] = json.loads(bytes(d['cases.json']).decode())
    return d

def _net(gmm):
    return MixtureDenoiser(gmm['gmm/mu'], gmm['gmm/s'], gmm['gmm/logpi'])

def _schedule_key(case):
    return f'schedule/{case["schedule_type"]}/rho{case["schedule_rho"]}/steps{case["num_steps"]}'

def _run(sampler, gmm, case, net=None, **kwargs):
    sigmas = gmm[_schedule_key(case)].astype(np.float64).tolist()
    return sampler(net or _net(gmm), torch.as_tensor(gmm['latents']), sigmas=sigmas, **case['options'], **kwargs)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('solver', list(SOLVERS))
def test_solver_reproduces_published_outputs(gmm, solver):
    cases = [case for case in gmm['cases'] if case['kind'] == 'solver' and case['solver'] == solver]
    assert cases
    errors = [np.abs(_run(SOLVERS[solver], gmm, case).numpy() - gmm[case['key']]).max() for case in cases]
    print(f'{solver}: {len(cases)} cases, max |ours - published| = {max(errors):.3g}')
    assert max(errors) <= 1e-9

def test_schedules_match_the_published_code(gmm):
    cases = [case for case in gmm['cases'] if case['kind'] == 'schedule']
    assert {case['schedule_type'] for case in cases} == {'polynomial', 'logsnr', 'time_uniform'}
    for case in cases:
        published = gmm[case['key']]
        ours = sigma_steps(case['num_steps'], 0.002, 80, case['schedule_type'], case['schedule_rho']).numpy()
        np.testing.assert_allclose(ours, published, rtol=2 ** -23, atol=0) # float32 round-off

def test_pasted_module_reproduces_published_outputs(gmm):
    # training/solvers.py pasted into a new file: its source run in a namespace holding only np and torch.
    namespace = dict(np=np, torch=torch)
    exec(inspect.getsource(solvers), namespace)
    for solver in SOLVERS:
        case = next(case for case in gmm['cases'] if case['kind'] == 'solver' and case['solver'] == solver)
        assert torch.equal(_run(namespace['SOLVERS'][solver], gmm, case), _run(SOLVERS[solver], gmm, case))

#----------------------------------------------------------------------------

@pytest.mark.parametrize('solver', list(SOLVERS))
def test_error_against_ode_solution_falls_as_steps_double(gmm, solver):
    # The ODE solution at sigma_min = 0.002 from sigma_max = 80, polynomial steps (EDM's rho = 7): 6, 12 and 24 steps.
    latents, exact = torch.as_tensor(gmm['latents']), gmm['ode_solution_at_0.002']
    errors = [np.abs(SOLVERS[solver](_net(gmm), latents, num_steps=steps + 1).numpy() - exact).max() for steps in (6, 12, 24)]
    print(f'{solver}: max error at 6, 12, 24 steps: ' + ', '.join(f'{e:.3g}' for e in errors))
    assert errors[2] < errors[1] < errors[0]

@pytest.mark.parametrize('solver', ['edm', *SOLVERS])
def test_solvers_make_the_stated_number_of_evaluations(gmm, solver):
    latents = torch.as_tensor(gmm['latents'])
    orders = ORDERS.get(solver, [None])
    for num_steps in (2, 3, 4, 7):
        for max_order in orders:
            for afs in ([False] if solver == 'edm' else [False, True]):
                options = {} if solver == 'edm' else dict(afs=afs, denoise_to_zero=not afs)
                if max_order is not None:
                    options['max_order'] = max_order
                net = _net(gmm)
                (solvers.edm_sampler if solver == 'edm' else SOLVERS[solver])(net, latents, num_steps=num_steps, **options)
                assert net.calls == num_evaluations(solver, num_steps, **options), (num_steps, options)

@pytest.mark.parametrize('solver', list(SOLVERS))
def test_guidance_weight_one_is_unguided(gmm, solver):
    # w = 1 is the network alone; so is any w when the guide is the network itself (D0 + w (D1 - D0) = D1).
    latents = torch.as_tensor(gmm['latents'])
    labels = torch.eye(2)[torch.arange(len(latents)) % 2]
    unguided = SOLVERS[solver](_net(gmm), latents, labels, num_steps=5)
    guide = MixtureDenoiser(gmm['gmm/mu'] * 0.5, gmm['gmm/s'], gmm['gmm/logpi'])
    assert torch.equal(SOLVERS[solver](_net(gmm), latents, labels, num_steps=5, gnet=guide, guidance=1), unguided)
    assert torch.equal(SOLVERS[solver](_net(gmm), latents, labels, num_steps=5, guidance=1), unguided)
    assert torch.equal(SOLVERS[solver](_net(gmm), latents, labels, num_steps=5, gnet=_net(gmm), guidance=2.5), unguided)
    assert not torch.equal(SOLVERS[solver](_net(gmm), latents, labels, num_steps=5, gnet=guide, guidance=2.5), unguided)

@pytest.mark.parametrize('solver', list(SOLVERS))
def test_batch_does_not_change_a_sample(gmm, solver):
    latents = torch.as_tensor(gmm['latents'])
    together = SOLVERS[solver](_net(gmm), latents, num_steps=5, schedule='logsnr')
    for i in range(len(latents)):
        assert torch.equal(SOLVERS[solver](_net(gmm), latents[i:i + 1], num_steps=5, schedule='logsnr'), together[i:i + 1])

#----------------------------------------------------------------------------

def test_bad_options_raise_value_error(gmm):
    net, latents = _net(gmm), torch.as_tensor(gmm['latents'])
    bad = [(dict(solver='ipndm', max_order=1), 'max_order of ipndm'), (dict(solver='dpm_pp', max_order=4), 'max_order of dpm_pp'),
           (dict(solver='unipc', variant='bh3'), 'variant'), (dict(solver='euler', schedule='cosine'), 'schedule'),
           (dict(solver='heun', num_steps=1), 'num_steps'), (dict(solver='deis', sigmas=[80, 1, 1]), 'sigmas'),
           (dict(solver='euler', sigmas=[80, -1]), 'sigmas'), (dict(solver='euler', sigmas=[80, float('nan')]), 'sigmas'),
           (dict(solver='euler', sigmas=[80]), 'sigmas')]
    for kwargs, match in bad:
        solver = kwargs.pop('solver')
        with pytest.raises(ValueError, match=match):
            SOLVERS[solver](net, latents, **kwargs)
    assert net.calls == 0

#----------------------------------------------------------------------------
