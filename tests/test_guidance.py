"""Guidance in the samplers (classifier-free guidance, autoguidance, guidance interval) against the
closed-form guided denoiser of two exact Gaussian denoisers, and in generate.py."""

import os

import numpy as np
import pytest
import torch

from click.testing import CliRunner

import generate
from conftest import run_script, write_network_pkl
from test_sampling import GaussianDenoiser
from training import networks
from training.sampling import edm_sampler, ablation_sampler, StackedRandomGenerator, edm_sigma_steps
from training.sampling_cli import check_guidance, parse_guidance_interval

SAMPLERS = {'edm': edm_sampler, 'ablation': ablation_sampler}
SEEDS = [0, 1, 2, 3]

#----------------------------------------------------------------------------
# Exact denoisers: data ~ N(mu, s^2 I) has D(x; sigma) = mu + a (x - mu), a = s^2 / (s^2 + sigma^2).

def _mu(offset):
    return torch.linspace(-0.8, 0.8, 192, dtype=torch.float64).reshape(3, 8, 8) + offset

class GuidedGaussianDenoiser(GaussianDenoiser):
    """The guided denoiser of D1 = N(mu1, s1^2 I) and D0 = N(mu0, s0^2 I), written as one linear map:
    D_w(x) = A x + b, A = (1 - w) a0 + w a1, b = (1 - w)(1 - a0) mu0 + w (1 - a1) mu1 for sigma in
    (lo, hi], else D1. mu1 may hold one mean per image [N, 3, 8, 8]."""

    def __init__(self, mu1, s1, mu0, s0, w, interval=(0, float('inf'))):
        super().__init__(mu1, s1)
        self.mu0, self.s0, self.w, self.interval = torch.as_tensor(mu0, dtype=torch.float64), float(s0), float(w), interval
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        lo, hi = self.interval
        if not lo < float(sigma) <= hi:
            return super().__call__(x, sigma)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        a1, a0, w = self.s ** 2 / (self.s ** 2 + sigma ** 2), self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2), self.w
        return ((1 - w) * a0 + w * a1) * x.to(torch.float64) + (1 - w) * (1 - a0) * self.mu0 + w * (1 - a1) * self.mu

class CountingGaussianDenoiser(GaussianDenoiser):
    """GaussianDenoiser that counts its calls and the images it denoised."""

    def __init__(self, mu, s):
        super().__init__(mu, s)
        self.calls = self.images = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls, self.images = self.calls + 1, self.images + len(x)
        return super().__call__(x, sigma, class_labels)

class ConditionalGaussianDenoiser(CountingGaussianDenoiser):
    """Exact denoiser of the class-conditional data N(mu_c, s^2 I); the zero label vector means the
    unconditional mean mu_u: mu(c) = c M + (1 - sum(c)) mu_u."""

    label_dim = 3

    def __init__(self, class_means, mu_u, s):
        super().__init__(mu_u, s)
        self.class_means = torch.as_tensor(class_means, dtype=torch.float64) # [label_dim, 3, 8, 8]

    def mean(self, class_labels):
        c = class_labels.to(torch.float64)
        return torch.einsum('nk,kchw->nchw', c, self.class_means) + (1 - c.sum(1)).reshape(-1, 1, 1, 1) * self.mu

    def __call__(self, x, sigma, class_labels=None):
        self.calls, self.images = self.calls + 1, self.images + len(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        mu = self.mean(class_labels)
        return mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x.to(torch.float64) - mu)

def _latents(seeds=SEEDS):
    return StackedRandomGenerator('cpu', seeds).randn([len(seeds), 3, 8, 8])

def _run(sampler, net, latents, class_labels=None, **kwargs):
    rnd = StackedRandomGenerator('cpu', SEEDS)
    return SAMPLERS[sampler](net, latents, class_labels, randn_like=rnd.randn_like, num_steps=8, **kwargs)

CHURN = dict(S_churn=5, S_min=0.05, S_max=20)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('sampler', SAMPLERS)
@pytest.mark.parametrize('churn', [False, True])
@pytest.mark.parametrize('w', [0, 0.5, 2.5])
def test_autoguidance_is_the_closed_form_guided_denoiser(sampler, churn, w):
    latents = _latents()
    D1, D0 = GaussianDenoiser(_mu(0), 0.5), GaussianDenoiser(_mu(0.3), 0.8)
    kwargs = CHURN if churn else {}
    guided = _run(sampler, D1, latents, gnet=D0, guidance=w, **kwargs)
    expected = _run(sampler, GuidedGaussianDenoiser(_mu(0), 0.5, _mu(0.3), 0.8, w), latents, **kwargs)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-10)
    if w != 1:
        assert (guided - _run(sampler, D1, latents, **kwargs)).abs().max() > 0.01

@pytest.mark.parametrize('sampler', SAMPLERS)
def test_classifier_free_guidance_batches_labels_and_zeros(sampler):
    # D0 is the same denoiser given the zero label vector: per image, N(mu_u) guides N(mu_c).
    class_means = torch.stack([_mu(offset) for offset in (-0.5, 0.2, 0.6)])
    net = ConditionalGaussianDenoiser(class_means, _mu(0), 0.5)
    labels = torch.eye(3)[torch.tensor([0, 2, 1, 2])]
    latents, w = _latents(), 3
    guided = _run(sampler, net, latents, labels, guidance=w)
    assert (net.calls, net.images) == (15, 15 * 2 * len(SEEDS)) # one batched call [x, x] per evaluation (2N - 1 = 15)
    expected = _run(sampler, GuidedGaussianDenoiser(net.mean(labels), 0.5, _mu(0), 0.5, w), latents)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-10)

@pytest.mark.parametrize('sampler', SAMPLERS)
@pytest.mark.parametrize('churn', [False, True])
def test_weight_one_is_unguided_bit_for_bit_and_free(sampler, churn):
    latents, kwargs = _latents(), (CHURN if churn else {})
    D1, D0 = CountingGaussianDenoiser(_mu(0), 0.5), CountingGaussianDenoiser(_mu(0.3), 0.8)
    plain = _run(sampler, D1, latents, **kwargs)
    calls = D1.calls
    for guide in [dict(gnet=D0), dict(), dict(gnet=D0, guidance_interval=(0.1, 5))]:
        assert torch.equal(_run(sampler, D1, latents, guidance=1, **guide, **kwargs), plain)
    assert D1.calls == 4 * calls and D0.calls == 0

@pytest.mark.parametrize('sampler', SAMPLERS)
def test_guidance_interval_is_honoured(sampler):
    # Bounds on the sampler's own noise levels test the half-open interval (lo, hi] exactly.
    t_steps = edm_sigma_steps(8, 0.002, 80, 7).tolist()
    latents, w = _latents(), 2
    D1, D0 = GaussianDenoiser(_mu(0), 0.5), CountingGaussianDenoiser(_mu(0.3), 0.8)
    for lo, hi in [(t_steps[5], t_steps[2]), (t_steps[7], t_steps[0]), (0, t_steps[6])]:
        D0.calls = 0
        guided = _run(sampler, D1, latents, gnet=D0, guidance=w, guidance_interval=(lo, hi))
        reference = GuidedGaussianDenoiser(_mu(0), 0.5, _mu(0.3), 0.8, w, interval=(lo, hi))
        torch.testing.assert_close(guided, _run(sampler, reference, latents), rtol=0, atol=1e-10)
        inside = sum(lo < t <= hi for t in t_steps + t_steps[1:]) # the Euler and the Heun evaluations
        assert 0 < D0.calls == inside < 15
    # An interval that holds no step is unguided, bit for bit.
    outside = _run(sampler, D1, latents, gnet=D0, guidance=w, guidance_interval=(t_steps[3] + 1e-9, t_steps[2] - 1e-9))
    assert torch.equal(outside, _run(sampler, D1, latents))

@pytest.mark.parametrize('sampler', SAMPLERS)
def test_sampler_rejects_unusable_guidance(sampler):
    net, latents = GaussianDenoiser(_mu(0), 0.5), _latents()
    with pytest.raises(ValueError, match='finite'):
        _run(sampler, net, latents, gnet=net, guidance=float('nan'))
    with pytest.raises(ValueError, match='class labels'):
        _run(sampler, net, latents, guidance=2)

#----------------------------------------------------------------------------
# Option checks of the command lines.

def test_guidance_interval_is_parsed_or_refused():
    assert parse_guidance_interval('0.28,5.42') == (0.28, 5.42)
    assert parse_guidance_interval('0,inf') == (0, float('inf'))
    assert parse_guidance_interval(None) is None
    for text in ['1', '2,1', '-1,2', 'a,b', '1,2,3', 'nan,1']:
        with pytest.raises(ValueError, match='--guidance-interval'):
            parse_guidance_interval(text)

def _tiny_net(label_dim=0, img_channels=3, img_resolution=8, label_dropout=0, seed=0):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                              model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                              attn_resolutions=[4], dropout=0, label_dropout=label_dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)

def test_guidance_needs_a_compatible_guide():
    cond, cfg = _tiny_net(label_dim=4), _tiny_net(label_dim=4, label_dropout=0.1)
    check_guidance(cfg, None, 2)
    check_guidance(cond, _tiny_net(label_dim=4, seed=1), 2)
    check_guidance(cond, None, 1)
    cases = [((_tiny_net(), None, 2), 'conditional network'),
             ((cond, None, 2), 'label dropout'),
             ((cfg, None, float('inf')), 'finite'),
             ((cond, _tiny_net(label_dim=3), 2), 'label_dim=3'),
             ((cond, _tiny_net(label_dim=4, img_channels=1), 2), 'img_channels=1'),
             ((cond, _tiny_net(label_dim=4, img_resolution=16), 2), 'img_resolution=16')]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            check_guidance(*args)

#----------------------------------------------------------------------------
# generate.py: a guided image depends only on its seed.

def _read_images(outdir):
    import PIL.Image
    return {name: np.array(PIL.Image.open(os.path.join(outdir, name))) for name in sorted(os.listdir(outdir))}

def _generate(outdir, *options, subprocess=False):
    """Run generate.py in a real process or in this one (single-threaded); {file name: pixels} of its images."""
    args = ['--seeds=0-4', '--steps=3', '--device=cpu', f'--outdir={outdir}', *options]
    if subprocess:
        run_script(['generate.py', *args])
    else:
        num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            res = CliRunner().invoke(generate.main, args)
        finally:
            torch.set_num_threads(num_threads)
        assert res.exit_code == 0, res.output
    return _read_images(outdir)

def test_generate_guided_images_depend_only_on_seed(tmp_path):
    cfg = write_network_pkl(tmp_path / 'cfg.pkl', _tiny_net(label_dim=4, label_dropout=0.1))
    guide = write_network_pkl(tmp_path / 'guide.pkl', _tiny_net(label_dim=4, seed=1))
    unguided = _generate(tmp_path / 'plain', f'--network={cfg}', '--batch=5')
    for name, options in [('auto', [f'--gnet={guide}', '--guidance=2', '--guidance-interval=0.5,50']), ('cfg', ['--guidance=3'])]:
        images = [_generate(tmp_path / f'{name}-{batch}', f'--network={cfg}', f'--batch={batch}', *options, subprocess=(name == 'auto' and batch == 5))
                  for batch in (5, 2)]
        assert list(images[0]) == list(images[1]) == [f'{seed:06d}.png' for seed in range(5)]
        # The network's float32 outputs depend on the batch size on CPUs by about 1e-6 (oneDNN's blocking; measured
        # 8e-7 for these networks), which D0 + w (D1 - D0) amplifies; rarely, a pixel rounds to the next level.
        diff = np.stack([np.abs(images[0][key].astype(int) - images[1][key].astype(int)) for key in unguided])
        print(f'{name}: {np.count_nonzero(diff)} of {diff.size} pixels differ between batch sizes, by at most {diff.max()}')
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 100, name
        assert not all(np.array_equal(images[0][key], unguided[key]) for key in unguided), name

@pytest.mark.parametrize('options, message', [
    (['--guidance=2'], 'label dropout'),
    (['--guidance=nan', '--gnet={guide}'], 'finite'),
    (['--guidance=2', '--guidance-interval=5,1'], 'guidance-interval'),
    (['--guidance=2', '--gnet={gray}'], 'img_channels=1'),
])
def test_generate_names_unusable_guidance(tmp_path, options, message):
    paths = dict(net=write_network_pkl(tmp_path / 'net.pkl', _tiny_net(label_dim=4)),
                 guide=write_network_pkl(tmp_path / 'guide.pkl', _tiny_net(label_dim=4, seed=1)),
                 gray=write_network_pkl(tmp_path / 'gray.pkl', _tiny_net(label_dim=4, img_channels=1)))
    res = CliRunner().invoke(generate.main, ['--network=' + paths['net'], f'--outdir={tmp_path / "out"}', '--seeds=0', '--device=cpu',
                                             *[option.format(**paths) for option in options]])
    assert res.exit_code != 0 and message in res.output and 'Traceback' not in res.output

#----------------------------------------------------------------------------
# fid.py: the statistics of guided samples are those of generate.py's guided images.

def test_fid_network_statistics_are_guided(tmp_path):
    import pickle
    import fid
    import fid_detector
    detector = fid_detector.ProjectionDetector(feature_dim=8)
    detector_pkl = tmp_path / 'detector.pkl'
    with open(detector_pkl, 'wb') as f:
        pickle.dump(detector, f)
    cfg = write_network_pkl(tmp_path / 'cfg.pkl', _tiny_net(label_dim=4, label_dropout=0.1))
    guide = write_network_pkl(tmp_path / 'guide.pkl', _tiny_net(label_dim=4, seed=1))
    options = dict(max_batch_size=5, device='cpu', detector_url=str(detector_pkl), allow_code=True, num_steps=3)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for guide_options in [dict(gnet_pkl=guide, guidance=2, guidance_interval=(0.5, 50)), dict(guidance=3)]:
            cli_options = ['--guidance=' + str(guide_options['guidance'])] + (['--gnet=' + guide, '--guidance-interval=0.5,50'] if 'gnet_pkl' in guide_options else [])
            images = _generate(tmp_path / str(len(cli_options)), f'--network={cfg}', '--batch=5', *cli_options)
            mu, sigma = fid.calculate_inception_stats_for_network(cfg, list(range(5)), **guide_options, **options)
            features = fid_detector.numpy_features(np.stack(list(images.values())), detector)
            np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-12)
        with pytest.raises(ValueError, match='label dropout'):
            fid.calculate_inception_stats_for_network(guide, list(range(5)), guidance=2, **options)
    finally:
        torch.set_num_threads(num_threads)
    res = CliRunner().invoke(fid.main, ['calc', f'--images={tmp_path}', f'--ref={tmp_path / "ref.npz"}', '--guidance=2'])
    assert res.exit_code != 0 and '--guidance: only with --network' in res.output

#----------------------------------------------------------------------------
# train.py --label-dropout.

def test_train_label_dropout_gives_a_network_for_classifier_free_guidance():
    import dnnlib
    import train
    dataset = dnnlib.EasyDict(name='x', resolution=8, num_channels=3, size=100, has_labels=True, label_dim=4)
    options = dict(outdir='runs', data='x.zip', cond=True, cbase=16, cres=[1, 2], seed=0)
    c, _desc = train.build_config(train.default_options(**options), dataset, device_type='cpu')
    assert 'label_dropout' not in c.network_kwargs # the presets stay as the reference writes them
    c, _desc = train.build_config(train.default_options(label_dropout=0.1, **options), dataset, device_type='cpu')
    assert c.network_kwargs.label_dropout == 0.1
    net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=8, img_channels=3, label_dim=4)
    check_guidance(net.eval(), None, 2)
    with pytest.raises(ValueError, match='--cond'):
        train.build_config(train.default_options(label_dropout=0.1, **dict(options, cond=False)), dataset, device_type='cpu')
