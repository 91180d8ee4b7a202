"""Losses of training/loss.py against their closed forms: the noise-level
distributions (Kolmogorov-Smirnov tests), the weightings, the draw order
(noise level, augmentation, noise) and the pickle format."""

import ast
import os
import pickle

import numpy as np
import pytest
import scipy.stats
import torch

from training import loss as loss_module
from training.augment import AugmentPipe

#----------------------------------------------------------------------------
# Stand-in denoisers with the network's call signature.

class RecordingNet:
    """Returns `output(x)` and records the sigma and augment labels it was given."""
    def __init__(self, output):
        self.output = output
        self.sigmas = []
        self.augment_labels = []

    def __call__(self, x, sigma, class_labels=None, augment_labels=None):
        self.sigmas.append(sigma.detach().clone())
        self.augment_labels.append(augment_labels)
        return self.output(x)

def zeros_net():
    return RecordingNet(torch.zeros_like)

def identity_net():
    return RecordingNet(lambda x: x.clone())

#----------------------------------------------------------------------------
# Closed forms (float64) from the paper's Table 1.

def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)

def vp_sigma_inv(sigma, beta_d=19.9, beta_min=0.1):
    return (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(sigma ** 2)) - beta_min) / beta_d

def draw_sigma(name, n, seed):
    """Noise levels the loss should draw first from torch's generator seeded with `seed`."""
    torch.manual_seed(seed)
    if name == 'EDMLoss':
        rnd_normal = torch.randn([n, 1, 1, 1]).double().numpy()
        return np.exp(rnd_normal * 1.2 - 1.2)
    rnd_uniform = torch.rand([n, 1, 1, 1]).double().numpy()
    if name == 'VELoss':
        return 0.02 * (100 / 0.02) ** rnd_uniform
    return vp_sigma(1 + rnd_uniform * (1e-5 - 1))

def weight(name, sigma):
    if name == 'EDMLoss':
        return (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
    return 1 / sigma ** 2

LOSSES = ['VPLoss', 'VELoss', 'EDMLoss']

def images_batch(n=6, seed=123):
    return torch.from_numpy(np.random.RandomState(seed).uniform(-1, 1, size=[n, 3, 8, 8]).astype(np.float32))

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', LOSSES)
def test_perfect_denoiser_has_zero_loss(name):
    images = images_batch()
    loss_fn = getattr(loss_module, name)()
    net = RecordingNet(lambda x: images.clone()) # knows the clean images
    loss = loss_fn(net, images, labels=None)
    assert loss.shape == images.shape
    assert torch.all(loss == 0)

@pytest.mark.parametrize('name', LOSSES)
def test_zero_denoiser_loss_is_weight_times_clean_squared(name):
    images = images_batch()
    loss_fn = getattr(loss_module, name)()
    torch.manual_seed(7)
    loss = loss_fn(zeros_net(), images, labels=None).double().numpy()
    sigma = draw_sigma(name, images.shape[0], seed=7) # the first draw of the same seed
    expected = weight(name, sigma) * images.double().numpy() ** 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

@pytest.mark.parametrize('name', LOSSES)
def test_net_gets_noisy_input_with_drawn_sigma(name):
    # The identity denoiser's loss is weight * n^2 with n = randn_like(y) * sigma, drawn after sigma.
    images = images_batch()
    loss_fn = getattr(loss_module, name)()
    net = identity_net()
    torch.manual_seed(11)
    loss = loss_fn(net, images, labels=None).double().numpy()
    torch.manual_seed(11)
    sigma = draw_sigma(name, images.shape[0], seed=11)
    noise = torch.randn_like(images).double().numpy() * sigma
    np.testing.assert_allclose(loss, weight(name, sigma) * noise ** 2, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(net.sigmas[0].double().numpy().reshape(-1), sigma.reshape(-1), rtol=1e-4)
    assert net.augment_labels[0] is None

def test_draw_order_sigma_then_augmentation_then_noise():
    images = images_batch(n=8)
    augment_pipe = AugmentPipe(p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    loss_fn = loss_module.EDMLoss()
    net = identity_net()
    torch.manual_seed(5)
    loss = loss_fn(net, images, labels=None, augment_pipe=augment_pipe)

    torch.manual_seed(5)
    sigma = (torch.randn([8, 1, 1, 1]) * 1.2 - 1.2).exp() # (1) noise level
    y, augment_labels = augment_pipe(images)            # (2) augmentation
    n = torch.randn_like(y) * sigma                     # (3) noise
    expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 * n ** 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net.augment_labels[0], augment_labels)
    assert augment_labels.shape == (8, 9)

#----------------------------------------------------------------------------
# Noise-level distributions: Kolmogorov-Smirnov tests with a fixed seed.

def recorded_sigmas(loss_fn, n=20000, seed=0):
    net = zeros_net()
    torch.manual_seed(seed)
    loss_fn(net, torch.ones([n, 1, 1, 1]), labels=None)
    return net.sigmas[0].double().numpy().reshape(-1)

def test_edm_log_sigma_is_normal():
    sigma = recorded_sigmas(loss_module.EDMLoss(P_mean=-1.2, P_std=1.2))
    assert scipy.stats.kstest(np.log(sigma), scipy.stats.norm(-1.2, 1.2).cdf).pvalue > 0.01
    assert scipy.stats.kstest(np.log(sigma), scipy.stats.norm(-1.0, 1.2).cdf).pvalue < 1e-6 # the test can tell

def test_ve_sigma_is_log_uniform():
    sigma = recorded_sigmas(loss_module.VELoss(sigma_min=0.02, sigma_max=100))
    u = np.log(sigma / 0.02) / np.log(100 / 0.02)
    assert scipy.stats.kstest(u, scipy.stats.uniform().cdf).pvalue > 0.01
    assert sigma.min() >= 0.02 * (1 - 1e-6) and sigma.max() <= 100 * (1 + 1e-6)

def test_vp_sigma_is_uniform_in_t():
    loss_fn = loss_module.VPLoss(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)
    sigma = recorded_sigmas(loss_fn)
    t = vp_sigma_inv(sigma)
    assert scipy.stats.kstest(t, scipy.stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 0.01
    assert scipy.stats.kstest(np.sqrt(t), scipy.stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue < 1e-6 # the test can tell

def test_vp_public_sigma_matches_closed_form():
    loss_fn = loss_module.VPLoss()
    t = np.array([1e-5, 0.01, 0.3, 1.0])
    np.testing.assert_allclose(loss_fn.sigma(torch.tensor(t)).numpy(), vp_sigma(t), rtol=1e-10)

#----------------------------------------------------------------------------
# Pickles: the losses travel inside network pickles.

@pytest.mark.parametrize('name, kwargs', [('VPLoss', dict(beta_d=10.0)), ('VELoss', dict(sigma_max=50)), ('EDMLoss', dict(P_mean=-1.0, sigma_data=0.25))])
def test_losses_survive_a_pickle_round_trip(name, kwargs):
    loss_fn = getattr(loss_module, name)(**kwargs)
    loaded = pickle.loads(pickle.dumps(loss_fn))
    assert loaded.init_kwargs == kwargs
    assert vars(loaded) == vars(loss_fn)
    images = images_batch()
    torch.manual_seed(3)
    a = loss_fn(zeros_net(), images)
    torch.manual_seed(3)
    b = loaded(zeros_net(), images)
    assert torch.equal(a, b)

def test_module_imports_only_what_the_reference_release_provides():
    # The module's source is executed by whatever release loads our pickles.
    with open(os.path.join(os.path.dirname(loss_module.__file__), 'loss.py')) as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{alias.name}' for alias in node.names}
    allowed = {'numpy', 'torch', 'torch_utils.persistence', 'torch_utils.misc'}
    stdlib = {'math', 'copy', 'functools', 'typing'}
    bad = [name for name in imported if name not in allowed and name.split('.')[0] not in stdlib and not name.startswith(('numpy.', 'torch.'))]
    assert not bad, f'loss.py imports {bad}'

#----------------------------------------------------------------------------
