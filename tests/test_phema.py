"""Post-hoc EMA against closed forms: the power-function EMA of a synthetic
weight trajectory, the Gram matrix of the profiles, reconstructions of
tracked and untracked lengths; then train.py --phema, resume and
reconstruct_ema.py end to end."""

import glob
import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, run_script

import reconstruct_ema
from training import networks, phema

#----------------------------------------------------------------------------
# Exponent and width.

def test_sigma_rel_and_gamma_are_inverse():
    # EDM2's tracked widths and their exponents, as the spec states them (about 16.97 and 6.94).
    assert phema.sigma_rel_to_gamma(0.050) == pytest.approx(16.97, abs=0.005)
    assert phema.sigma_rel_to_gamma(0.100) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in [0.005, 0.03, 0.075, 0.15, 0.28]:
        assert phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)

def test_sigma_rel_is_the_relative_std_of_the_profile():
    # Moments of p(tau) = (g + 1) tau**g on [0, 1] by quadrature.
    tau = np.linspace(0, 1, 200001)
    for sigma_rel in [0.05, 0.1, 0.2]:
        g = phema.sigma_rel_to_gamma(sigma_rel)
        p = (g + 1) * tau ** g
        mean = np.trapezoid(p * tau, tau) if hasattr(np, 'trapezoid') else np.trapz(p * tau, tau)
        var = (np.trapezoid(p * tau ** 2, tau) if hasattr(np, 'trapezoid') else np.trapz(p * tau ** 2, tau)) - mean ** 2
        assert np.sqrt(var) == pytest.approx(sigma_rel, rel=1e-6)

@pytest.mark.parametrize('text', ['0', '0.3', '-0.1', 'abc', '0.05,0.0501'])
def test_bad_stds_are_clear_errors(text):
    with pytest.raises(ValueError, match='--phema'):
        phema.parse_stds(text, '--phema')

#----------------------------------------------------------------------------
# A synthetic trajectory theta(t), t = 1..T steps of 64 images: each weight
# is a0 + a1 sin(2 pi f t / T) + a2 (t / T)**2 with random a0, a1, a2.

BATCH = 64
STEPS = 250 # 16,000 images: saves every kimg end on the last step
KIMGS = list(range(1, 17))
STDS = [0.050, 0.100]

def trajectory(num_weights, steps=STEPS, seed=0):
    """[steps, num_weights] float64: row t - 1 is theta(t)."""
    rnd = np.random.RandomState(seed)
    a0, a1, a2 = rnd.randn(3, num_weights)
    t = np.arange(1, steps + 1, dtype=np.float64)[:, None]
    return a0 + a1 * np.sin(2 * np.pi * 3.5 * t / steps) + a2 * (t / steps) ** 2

def direct_weights(gamma, T):
    """Weight of theta(tau) in the average after step T: (1 - beta(tau)) * prod_{s = tau + 1}^{T} beta(s)."""
    beta = (1 - 1 / np.arange(1, T + 1, dtype=np.float64)) ** (gamma + 1)
    later = np.append(np.cumprod(beta[::-1])[::-1][1:], 1.0) # prod of beta(s), s > tau
    return (1 - beta) * later

def set_weights(net, theta):
    torch.nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=torch.float32), net.parameters())

def get_weights(net):
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach().double().numpy()

def test_direct_weights_are_the_power_function_profile():
    # prod_{s>tau} (1 - 1/s)**(g+1) = (tau/T)**(g+1), so each weight is the profile's mass on [tau - 1, tau].
    for sigma_rel in STDS:
        g = phema.sigma_rel_to_gamma(sigma_rel)
        tau = np.arange(1, STEPS + 1, dtype=np.float64)
        expected = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / STEPS ** (g + 1)
        np.testing.assert_allclose(direct_weights(g, STEPS), expected, rtol=1e-10, atol=1e-300)

def test_tracked_average_equals_the_direct_formula():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    theta = trajectory(sum(p.numel() for p in net.parameters()))
    tracker = phema.PowerFunctionEMA(net, STDS)
    for t in range(1, STEPS + 1):
        set_weights(net, theta[t - 1])
        tracker.update(net, nimg=t * BATCH, batch_size=BATCH)
    for sigma_rel, ema in zip(STDS, tracker.emas):
        expected = direct_weights(phema.sigma_rel_to_gamma(sigma_rel), STEPS) @ theta
        # float32 weights and 250 float32 updates: errors of a few float32 ulps of |theta| (up to ~3).
        np.testing.assert_allclose(get_weights(ema), expected, rtol=0, atol=2e-6)

def test_gram_matrix_matches_quadrature():
    gammas, times = [16.97, 6.94, 3.0], [1000.0, 700.0, 400.0]
    A = phema.profile_inner_products(gammas, times, gammas, times)
    tau = np.linspace(0, 1000, 400001)
    profiles = [np.where(tau <= T, (g + 1) * np.minimum(tau, T) ** g / T ** (g + 1), 0) for g, T in zip(gammas, times)]
    integrate = np.trapezoid if hasattr(np, 'trapezoid') else np.trapz
    for i in range(3):
        for j in range(3):
            assert A[i, j] == pytest.approx(integrate(profiles[i] * profiles[j], tau), rel=1e-4)

#----------------------------------------------------------------------------
# Reconstruction from phema snapshots written by the tracker.

@pytest.fixture(scope='module')
def tracked_run(tmp_path_factory):
    """A run directory of phema snapshots (every kimg, 16 times x 2 stds) of a small network following trajectory()."""
    run_dir = str(tmp_path_factory.mktemp('phema-run'))
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[], dropout=0)
    theta = trajectory(sum(p.numel() for p in net.parameters()))
    tracker = phema.PowerFunctionEMA(net, STDS, snapshot_kimg=1, run_dir=run_dir, snapshot_data=dict(loss_fn=None, augment_pipe=None, dataset_kwargs=dict(resolution=8)))
    for t in range(1, STEPS + 1):
        set_weights(net, theta[t - 1])
        tracker.update(net, nimg=t * BATCH, batch_size=BATCH)
    tracker.snapshot(STEPS * BATCH, done=True)
    return dict(run_dir=run_dir, theta=theta)

def test_snapshots_record_their_profile(tracked_run):
    names = sorted(os.listdir(tracked_run['run_dir']))
    assert names == sorted(f'phema-{k:06d}-{s:.3f}.pkl' for k in KIMGS for s in STDS)
    with open(os.path.join(tracked_run['run_dir'], 'phema-000016-0.050.pkl'), 'rb') as f:
        data = pickle.load(f)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs', 'phema'}
    assert data['phema'] == dict(std=0.05, gamma=phema.sigma_rel_to_gamma(0.05), nimg=STEPS * BATCH)

def test_reconstructing_a_tracked_std_returns_its_snapshot(tracked_run):
    for sigma_rel in STDS:
        nimg, [(_, data, residual)] = phema.reconstruct(tracked_run['run_dir'], [sigma_rel], verbose=False)
        assert nimg == STEPS * BATCH and residual < 1e-6
        with open(os.path.join(tracked_run['run_dir'], f'phema-000016-{sigma_rel:.3f}.pkl'), 'rb') as f:
            stored = get_weights(pickle.load(f)['ema'])
        np.testing.assert_allclose(get_weights(data['ema']), stored, rtol=0, atol=1e-5)

@pytest.mark.parametrize('sigma_rel', [0.075, 0.040, 0.150])
def test_reconstruction_between_tracked_stds_matches_the_exact_ema(tracked_run, sigma_rel):
    """Error bound. The tracked averages are exactly sum_tau w_tau theta(tau), w_tau the profile's mass
    on [tau - 1, tau]: the continuous profile integrated against the step function theta_bar(s) =
    theta(ceil(s)). So is the exact EMA of the target. Their difference is therefore the integral of
    (sum_i x_i p_i - p_r) * theta_bar, which Cauchy-Schwarz bounds per weight by
    ||sum_i x_i p_i - p_r|| * ||theta_bar|| = residual * ||p_r|| * sqrt(sum_tau theta(tau)**2),
    with ||p_r||**2 = (g + 1)**2 / ((2g + 1) T) in steps. Plus float32 rounding of the stored averages
    (2e-6 each, see above) times sum_i |x_i|, and of the result (1e-6)."""
    theta = tracked_run['theta']
    g = phema.sigma_rel_to_gamma(sigma_rel)
    _, [(_, data, residual)] = phema.reconstruct(tracked_run['run_dir'], [sigma_rel], verbose=False)
    exact = direct_weights(g, STEPS) @ theta
    error = np.abs(get_weights(data['ema']) - exact)

    gammas = [phema.sigma_rel_to_gamma(s) for s in STDS for _ in KIMGS]
    times = [-(-1000 * k // BATCH) * BATCH for _ in STDS for k in KIMGS] # the first step at or past each kimg
    x, residual_again = phema.solve_coefficients(gammas, times, g, STEPS * BATCH)
    assert residual_again == pytest.approx(residual)
    p_r_norm = np.sqrt((g + 1) ** 2 / ((2 * g + 1) * STEPS))
    bound = residual * p_r_norm * np.sqrt((theta ** 2).sum(axis=0)) + 2e-6 * np.abs(x).sum() + 1e-6
    assert (error <= bound).all(), f'max error {error.max():.3g}, bound there {bound[error.argmax()]:.3g}'

    # The bound holds for the worst trajectory; on this smooth one the error is a small fraction of the
    # difference from the nearest tracked average (measured: 1.1%, 0.11% and 0.32% of it).
    nearest = min(STDS, key=lambda s: abs(s - sigma_rel))
    naive_error = np.abs(direct_weights(phema.sigma_rel_to_gamma(nearest), STEPS) @ theta - exact)
    assert error.mean() < 0.05 * naive_error.mean()

def test_reconstruction_at_an_earlier_time(tracked_run):
    # At 8 kimg the snapshots after it are ignored and the target time is that of the 8-kimg snapshot (step 125).
    nimg, [(_, data, residual)] = phema.reconstruct(tracked_run['run_dir'], [0.100], at_kimg=8, verbose=False)
    assert nimg == 8000 and residual < 1e-6
    exact = direct_weights(phema.sigma_rel_to_gamma(0.1), 8000 // BATCH) @ tracked_run['theta'][:8000 // BATCH]
    np.testing.assert_allclose(get_weights(data['ema']), exact, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match='kimg 1, 2, 3'):
        phema.reconstruct(tracked_run['run_dir'], [0.1], at_kimg=17, verbose=False)

#----------------------------------------------------------------------------
# train.py --phema end to end: files, exact resume, reconstruct_ema.py, generate.py.

def _tiny_data(path):
    import io
    import zipfile
    import PIL.Image
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(16):
            buf = io.BytesIO()
            PIL.Image.fromarray(rnd.randint(0, 256, size=[8, 8, 3], dtype=np.uint8)).save(buf, format='png')
            z.writestr(f'{i:08d}'[:5] + f'/img{i:08d}.png', buf.getvalue())
    return str(path)

def _train(outdir, data, *extra):
    run_script(['train.py', f'--outdir={outdir}', f'--data={data}', '--cbase=16', '--cres=1,2', '--batch=32', '--tick=1',
                '--device=cpu', '--seed=0', '--workers=0', '--phema=0.050,0.100', *extra])
    return sorted(glob.glob(os.path.join(str(outdir), '0*')))[-1]

def _load(path):
    if path.endswith('.pt'):
        return torch.load(path, map_location='cpu', weights_only=False)
    with open(path, 'rb') as f:
        return pickle.load(f)

@pytest.fixture(scope='module')
def phema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('phema-train')
    data = _tiny_data(root / 'tiny8.zip')
    return dict(data=data, run_dir=_train(root / 'runs', data, '--duration=0.002', '--snap=1', '--dump=1'))

def test_train_saves_phema_with_snapshots(phema_run):
    run_dir = phema_run['run_dir']
    names = sorted(name for name in os.listdir(run_dir) if name.startswith('phema-'))
    assert names == [f'phema-{k:06d}-{s:.3f}.pkl' for k in range(3) for s in STDS]
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        assert json.load(f)['phema_kwargs'] == dict(stds=STDS, snapshot_kimg=None)
    state = _load(os.path.join(run_dir, 'training-state-000002.pt'))
    stored = _load(os.path.join(run_dir, 'phema-000002-0.100.pkl'))
    assert stored['phema']['nimg'] == state['cur_nimg']
    for name, tensor in stored['ema'].named_parameters():
        assert torch.equal(tensor, state['phema']['emas'][1][name]), name

def test_resume_continues_the_phema_exactly(phema_run, tmp_path):
    # Saved every kimg rather than with snapshots (which changes when, not what): 1024 images, then 2016 at the end.
    first = _train(tmp_path, phema_run['data'], '--duration=0.001', '--snap=1', '--dump=1', '--phema-snap=1')
    second = _train(tmp_path, phema_run['data'], '--duration=0.002', '--snap=1', '--dump=1', '--phema-snap=1',
                    f'--resume={os.path.join(first, "training-state-000001.pt")}')
    assert sorted(name for name in os.listdir(first) if name.startswith('phema-')) == [f'phema-000001-{s:.3f}.pkl' for s in STDS]
    assert sorted(name for name in os.listdir(second) if name.startswith('phema-')) == [f'phema-000002-{s:.3f}.pkl' for s in STDS]
    for std in STDS:
        a = _load(os.path.join(second, f'phema-000002-{std:.3f}.pkl'))['ema']
        b = _load(os.path.join(phema_run['run_dir'], f'phema-000002-{std:.3f}.pkl'))['ema']
        for (name, ta), (_, tb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(ta, tb), name

def test_reconstruct_ema_writes_a_pickle_generate_samples(phema_run, tmp_path):
    res = run_script(['reconstruct_ema.py', f'--run={phema_run["run_dir"]}', '--std=0.07,0.15', f'--dest={tmp_path}/ema-{{std}}.pkl'])
    assert 'sigma_rel 0.070 at 2016 images' in res.stdout
    data = _load(str(tmp_path / 'ema-0.070.pkl'))
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'} # the layout of network-snapshot-*.pkl
    assert type(data['ema']).__name__ == 'EDMPrecond' and data['dataset_kwargs']['resolution'] == 8
    run_script(['generate.py', f'--network={tmp_path}/ema-0.150.pkl', f'--outdir={tmp_path}/images', '--seeds=0-1', '--steps=4', '--device=cpu'])
    assert len(glob.glob(str(tmp_path / 'images' / '*.png'))) == 2

def test_fractional_ticks_give_each_phema_save_its_own_name(phema_run, tmp_path):
    # --tick=0.25 with batch 32: five ticks in 1024 images, each with a snapshot and phema saves named like the
    # snapshot (NNNNNN.NNN), none overwriting another; reconstruct_ema.py takes such a time for --at.
    run_dir = _train(tmp_path / 'runs', phema_run['data'], '--duration=0.001', '--tick=0.25', '--snap=1', '--dump=100')
    snapshots = sorted(name[len('network-snapshot-'):-len('.pkl')] for name in os.listdir(run_dir) if name.startswith('network-snapshot-'))
    assert len(snapshots) == 5 and snapshots[0].startswith('000000.') and snapshots[-1] == '000001.024', snapshots
    names = sorted(name for name in os.listdir(run_dir) if name.startswith('phema-'))
    assert names == [f'phema-{label}-{s:.3f}.pkl' for label in snapshots for s in STDS]
    nimg = int(snapshots[1].replace('.', ''))
    assert _load(os.path.join(run_dir, f'phema-{snapshots[1]}-0.050.pkl'))['phema']['nimg'] == nimg
    res = run_script(['reconstruct_ema.py', f'--run={run_dir}', '--std=0.07', f'--at={nimg / 1000}', f'--dest={tmp_path / "sweep"}'])
    assert f'at {nimg} images' in res.stdout and os.listdir(tmp_path / 'sweep') == [f'reconstructed-{snapshots[1]}-0.070.pkl']

@pytest.mark.parametrize('args, message', [
    (['--std=0.5', '--dest=x.pkl'], 'outside (0, 0.2887)'),
    (['--std=0.05,0.1', '--dest=x.pkl'], 'names one file'),
    (['--std=0.05,0.1', '--dest=x-{kimg}.pkl'], 'include {std}'),
    (['--std=0.05', '--at=20', '--dest=x.pkl'], '--at=20: '),
    (['--std=0.05', '--dest=x.pkl', '--run=missing'], 'run directory not found'),
])
def test_reconstruct_ema_errors_are_one_line(tracked_run, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(reconstruct_ema.main, [f'--run={tracked_run["run_dir"]}'] + args)
    assert res.exit_code != 0 and message in res.output and not isinstance(res.exception, (ValueError, OSError))
    assert not os.listdir(tmp_path)

def test_run_dir_without_phema_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(reconstruct_ema.main, [f'--run={tmp_path}', '--std=0.05', f'--dest={tmp_path}/x.pkl'])
    assert res.exit_code != 0 and 'train with --phema' in res.output

#----------------------------------------------------------------------------
