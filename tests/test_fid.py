"""fid.py: the FID formula against the reference fixture, and `ref` / `calc`
run as real processes with a small projection detector (fid_detector.py)
whose features are recomputed here with numpy."""

import functools
import http.server
import io
import os
import pickle
import re
import threading
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT, fixture_file, free_port, make_tiny_net, run_script, run_torchrun, subprocess_env, write_network_pkl
import fid_detector

NUM_IMAGES = 40 # more than the feature size (16), so sigma is well conditioned and FID(P, P) is ~1e-15

#----------------------------------------------------------------------------
# Helpers.

def random_images(num, resolution=8, channels=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[num, resolution, resolution, channels]).astype(np.uint8)

def png_bytes(image):
    picture = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    buf = io.BytesIO()
    picture.save(buf, format='PNG')
    return buf.getvalue()

def write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        with open(os.path.join(folder, f'img{i:04d}.png'), 'wb') as f:
            f.write(png_bytes(image))
    return str(folder)

def write_zip(path, images):
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, image in enumerate(images):
            z.writestr(f'{i // 10:05d}/img{i:08d}.png', png_bytes(image))
    return str(path)

def read_folder(folder):
    names = sorted(name for name in os.listdir(folder) if name.endswith('.png'))
    return np.stack([np.array(PIL.Image.open(os.path.join(folder, name))).reshape(8, 8, -1) for name in names])

def numpy_stats(images, detector):
    features = fid_detector.numpy_features(images, detector)
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)

def fid_cmd(*args, env=None, check=True):
    return run_script(['fid.py', *args, '--allow-code'], env=env, check=check) # the stand-in detector is code of ours, not the known one

def last_float(res):
    return float(res.stdout.strip().splitlines()[-1])

def error_line(res):
    """The one 'Error: ...' line of a failed command; there is no traceback."""
    assert res.returncode != 0, res.stdout + res.stderr
    assert 'Traceback' not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, res.stderr
    return lines[0]

#----------------------------------------------------------------------------
# Shared setup: images, the detector pickle (also served over HTTP) and the
# reference statistics computed through that URL.

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('fid')
    s = dict(root=root, images=random_images(NUM_IMAGES))
    s['image_dir'] = write_folder(root / 'images', s['images'])
    s['detector'] = fid_detector.ProjectionDetector(feature_dim=16)
    s['detector_pkl'] = str(root / 'served' / 'detector.pkl')
    os.makedirs(root / 'served')
    with open(s['detector_pkl'], 'wb') as f:
        pickle.dump(s['detector'], f)
    s['env'] = subprocess_env(DNNLIB_CACHE_DIR=root / 'cache')

    # A real HTTP server on loopback serves the detector pickle.
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(root / 'served')))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s['detector_url'] = f'http://127.0.0.1:{server.server_address[1]}/detector.pkl'

    # Reference statistics through the URL, into a folder that does not exist yet; one DataLoader worker.
    s['ref_npz'] = str(root / 'refs' / 'sub' / 'images.npz')
    fid_cmd('ref', '--data', s['image_dir'], '--dest', s['ref_npz'], '--batch', 16, '--detector', s['detector_url'],
            '--device', 'cpu', '--workers', 1, env=s['env'])
    yield s
    server.shutdown()
    server.server_close()

def calc(s, images, ref, *args, check=True):
    return fid_cmd('calc', '--images', images, '--ref', ref, '--detector', s['detector_pkl'], '--device', 'cpu',
                   '--workers', 0, *args, env=s['env'], check=check)

#----------------------------------------------------------------------------
# The formula.

def test_fid_from_stats_matches_reference_fixture():
    import fid
    data = np.load(fixture_file('fid-from-stats.npz'))
    for i in range(3):
        case = {name: data[f'case{i}/{name}'] for name in ('mu', 'sigma', 'mu_ref', 'sigma_ref', 'fid')}
        value = fid.calculate_fid_from_inception_stats(case['mu'], case['sigma'], case['mu_ref'], case['sigma_ref'])
        np.testing.assert_allclose(value, case['fid'], rtol=1e-6)

#----------------------------------------------------------------------------
# Statistics and FID of image folders.

def test_ref_writes_exactly_mu_and_sigma_equal_to_numpy(setup):
    s = setup
    with np.load(s['ref_npz']) as data:
        assert sorted(data.files) == ['mu', 'sigma']
        mu, sigma = data['mu'], data['sigma']
    assert mu.dtype == np.float64 and mu.shape == (16,) and sigma.shape == (16, 16)
    mu_np, sigma_np = numpy_stats(s['images'], s['detector'])
    np.testing.assert_allclose(mu, mu_np, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sigma, sigma_np, rtol=1e-9, atol=1e-13)
    assert os.listdir(os.path.dirname(s['ref_npz'])) == ['images.npz'] # no temporary file left behind

def test_calc_same_images_gives_zero_and_brighter_images_larger(setup, tmp_path):
    s = setup
    res = calc(s, s['image_dir'], s['ref_npz'], '--num', NUM_IMAGES, '--batch', 16)
    assert abs(last_float(res)) < 1e-6

    brighter = np.clip(s['images'].astype(np.int64) + 40, 0, 255).astype(np.uint8)
    res = calc(s, write_folder(tmp_path / 'brighter', brighter), s['ref_npz'], '--num', NUM_IMAGES)
    import fid
    expected = fid.calculate_fid_from_inception_stats(*numpy_stats(brighter, s['detector']), *numpy_stats(s['images'], s['detector']))
    assert expected > 1e-2
    np.testing.assert_allclose(last_float(res), expected, rtol=1e-5) # printed with 6 significant digits

def test_calc_num_picks_the_seeded_random_subset(setup, tmp_path):
    # The subset rule of data.md: RandomState(seed) shuffles the indices, the first --num are kept.
    s = setup
    num, seed = 30, 5
    order = np.arange(NUM_IMAGES)
    np.random.RandomState(seed).shuffle(order)
    subset = s['images'][np.sort(order[:num])]
    mu, sigma = numpy_stats(subset, s['detector'])
    np.savez(tmp_path / 'subset.npz', mu=mu, sigma=sigma)
    res = calc(s, s['image_dir'], tmp_path / 'subset.npz', '--num', num, '--seed', seed)
    assert abs(last_float(res)) < 1e-6

def test_grayscale_images_are_repeated_to_rgb(setup, tmp_path):
    s = setup
    gray = random_images(NUM_IMAGES, channels=1, seed=1)
    fid_cmd('ref', '--data', write_zip(tmp_path / 'gray.zip', gray), '--dest', tmp_path / 'gray.npz', '--detector', s['detector_pkl'],
            '--device', 'cpu', '--workers', 0, env=s['env'])
    with np.load(tmp_path / 'gray.npz') as data:
        mu, sigma = data['mu'], data['sigma']
    mu_np, sigma_np = numpy_stats(np.repeat(gray, 3, axis=3), s['detector'])
    np.testing.assert_allclose(mu, mu_np, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sigma, sigma_np, rtol=1e-9, atol=1e-13)

def test_two_processes_give_the_same_statistics(setup, tmp_path):
    s = setup
    dest = tmp_path / 'two.npz'
    run_torchrun(['fid.py', 'ref', '--data', s['image_dir'], '--dest', dest, '--batch', 16, '--detector', s['detector_pkl'],
                  '--device', 'cpu', '--workers', 0, '--allow-code'], env=s['env'])
    with np.load(dest) as two, np.load(s['ref_npz']) as one:
        np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-10, atol=0)
        np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-10, atol=1e-14)

#----------------------------------------------------------------------------
# Sampling a network in memory equals writing PNGs with generate.py.

def test_network_samples_equal_generated_pngs(setup, tmp_path):
    import fid
    s = setup
    net = make_tiny_net(label_dim=3, img_resolution=8)
    pkl = write_network_pkl(tmp_path / 'net.pkl', net)
    seeds, opts = list(range(20)), ['--batch', 8, '--steps', 3]
    run_script(['generate.py', '--network', pkl, '--outdir', tmp_path / 'png', '--seeds', '0-19', *opts, '--device', 'cpu'])
    pngs = read_folder(tmp_path / 'png')

    # The pixels and the statistics, in this process, single-threaded like the child processes (same float round-off).
    fid_cmd('ref', '--data', tmp_path / 'png', '--dest', tmp_path / 'png.npz', '--detector', s['detector_pkl'], '--device', 'cpu',
            '--workers', 0, env=s['env'])
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = torch.cat(list(fid.generate_image_batches(net, seeds, max_batch_size=8, device='cpu', num_steps=3)))
        mu, sigma = fid.calculate_inception_stats_for_network(pkl, seeds, max_batch_size=8, device='cpu', detector_url=s['detector_pkl'],
                                                              allow_code=True, num_steps=3)
    finally:
        torch.set_num_threads(num_threads)
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), pngs)
    with np.load(tmp_path / 'png.npz') as ref:
        np.testing.assert_allclose(mu, ref['mu'], rtol=1e-12, atol=0)
        np.testing.assert_allclose(sigma, ref['sigma'], rtol=1e-12, atol=1e-15)

    # The FID through the command line.
    res = fid_cmd('calc', '--network', pkl, '--seeds', '0-19', *opts, '--ref', tmp_path / 'png.npz', '--detector', s['detector_pkl'],
                  '--device', 'cpu', env=s['env'])
    assert abs(last_float(res)) < 1e-6

    # Compiled and in bfloat16: the same statistics up to rounding.
    res = fid_cmd('calc', '--network', pkl, '--seeds', '0-19', *opts, '--ref', tmp_path / 'png.npz', '--detector', s['detector_pkl'],
                  '--device', 'cpu', '--precision', 'bf16', '--compile', env=s['env'])
    print(f'FID of bf16 + compile samples against the fp32 PNGs: {last_float(res):g}')
    assert 0 <= last_float(res) < 1e-2

def test_network_samples_with_a_low_step_solver_equal_generated_pngs(setup, tmp_path):
    # The solver options of generate.py mean the same in fid.py calc --network: the FID against the PNGs' statistics is 0.
    s = setup
    pkl = write_network_pkl(tmp_path / 'net.pkl', make_tiny_net(label_dim=3, img_resolution=8))
    opts = ['--batch', 4, '--solver', 'dpm_pp', '--order', 2, '--schedule', 'logsnr', '--steps', 4, '--denoise-to-zero']
    run_script(['generate.py', '--network', pkl, '--outdir', tmp_path / 'png', '--seeds', '0-19', *opts, '--device', 'cpu'])
    fid_cmd('ref', '--data', tmp_path / 'png', '--dest', tmp_path / 'png.npz', '--detector', s['detector_pkl'], '--device', 'cpu',
            '--workers', 0, env=s['env'])
    res = fid_cmd('calc', '--network', pkl, '--seeds', '0-19', *opts, '--ref', tmp_path / 'png.npz', '--detector', s['detector_pkl'],
                  '--device', 'cpu', env=s['env'])
    assert abs(last_float(res)) < 1e-6
    res = fid_cmd('calc', '--network', pkl, '--seeds', '0-19', '--batch', 4, '--steps', 4, '--ref', tmp_path / 'png.npz',
                  '--detector', s['detector_pkl'], '--device', 'cpu', env=s['env'])
    assert last_float(res) > 1e-3 # EDM's sampler gives other images

#----------------------------------------------------------------------------
# Clear one-line errors.

def test_error_fewer_images_than_num(setup):
    line = error_line(calc(setup, setup['image_dir'], setup['ref_npz'], '--num', 50, check=False))
    assert f'found {NUM_IMAGES} images' in line and '50' in line

def test_error_fewer_than_two_images(setup, tmp_path):
    res = fid_cmd('ref', '--data', write_folder(tmp_path / 'one', random_images(1)), '--dest', tmp_path / 'one.npz',
                  '--detector', setup['detector_pkl'], '--device', 'cpu', env=setup['env'], check=False)
    assert 'at least 2' in error_line(res)
    assert not os.path.exists(tmp_path / 'one.npz')

def test_error_reference_without_mu_and_sigma(setup, tmp_path):
    np.savez(tmp_path / 'bad.npz', mean=np.zeros(16), cov=np.eye(16))
    line = error_line(calc(setup, setup['image_dir'], tmp_path / 'bad.npz', '--num', 2, check=False))
    assert 'bad.npz' in line and 'mu and sigma' in line

def test_a_damaged_reference_is_named_in_the_error(setup, tmp_path):
    with open(setup['ref_npz'], 'rb') as f:
        (tmp_path / 'cut.npz').write_bytes(f.read()[:300]) # a download cut short
    line = error_line(calc(setup, setup['image_dir'], tmp_path / 'cut.npz', '--num', 2, check=False))
    assert 'cut.npz' in line and 'not a readable .npz' in line

def test_ref_adds_npz_suffix_as_np_savez(setup, tmp_path):
    fid_cmd('ref', '--data', setup['image_dir'], '--dest', tmp_path / 'stats', '--detector', setup['detector_pkl'],
            '--device', 'cpu', '--workers', 0, env=setup['env'])
    assert os.listdir(tmp_path) == ['stats.npz']
    with np.load(tmp_path / 'stats.npz') as made, np.load(setup['ref_npz']) as ref:
        np.testing.assert_allclose(made['mu'], ref['mu'], rtol=1e-10)

def test_error_images_with_alpha(setup, tmp_path):
    folder = tmp_path / 'rgba'
    folder.mkdir()
    for i, image in enumerate(random_images(4, channels=4)):
        PIL.Image.fromarray(image, 'RGBA').save(folder / f'img{i}.png')
    res = fid_cmd('ref', '--data', folder, '--dest', tmp_path / 'x.npz', '--detector', setup['detector_pkl'],
                  '--device', 'cpu', '--workers', 0, env=setup['env'], check=False)
    line = error_line(res)
    assert str(folder) in line and '4 channels' in line

def test_error_reference_of_another_feature_size(setup, tmp_path):
    np.savez(tmp_path / 'dim10.npz', mu=np.zeros(10), sigma=np.eye(10))
    line = error_line(calc(setup, setup['image_dir'], tmp_path / 'dim10.npz', '--num', 2, check=False))
    assert '16-dimensional' in line and '10-dimensional' in line

def test_error_images_of_mixed_sizes(setup, tmp_path):
    folder = write_folder(tmp_path / 'mixed', random_images(6, resolution=8))
    with open(os.path.join(folder, 'img9999.png'), 'wb') as f:
        f.write(png_bytes(random_images(1, resolution=16)[0]))
    res = fid_cmd('ref', '--data', folder, '--dest', tmp_path / 'mixed.npz', '--detector', setup['detector_pkl'], '--allow-rank-deficient',
                  '--device', 'cpu', '--workers', 2, env=setup['env'], check=False) # raised in a DataLoader worker
    line = error_line(res)
    assert 'img9999.png' in line and 'shape' in line

def test_error_on_one_rank_stops_every_rank_cleanly(setup, tmp_path):
    folder = write_folder(tmp_path / 'mixed', random_images(6, resolution=8))
    with open(os.path.join(folder, 'img9999.png'), 'wb') as f:
        f.write(png_bytes(random_images(1, resolution=16)[0]))
    res = run_torchrun(['fid.py', 'ref', '--data', folder, '--dest', tmp_path / 'x.npz', '--detector', setup['detector_pkl'],
                        '--allow-rank-deficient', '--device', 'cpu', '--batch', 2, '--workers', 0, '--allow-code'], nproc=2, check=False)
    errors = sorted(re.findall(r'(?<![A-Za-z])Error: [^\r\n]*', res.stderr)) # a progress bar may precede one on its line
    assert res.returncode != 0 and f'File "{ROOT}' not in res.stderr, res.stderr # torchrun's launcher prints its own traceback
    assert len(errors) == 2 and 'img9999.png' in errors[0] and 'another process of this run stopped' in errors[1], res.stderr
    assert not os.path.exists(tmp_path / 'x.npz')

def test_error_detector_without_n_by_d_features(setup, tmp_path):
    with open(tmp_path / 'flat.pkl', 'wb') as f:
        pickle.dump(fid_detector.ProjectionDetector(output='flat'), f)
    res = fid_cmd('ref', '--data', setup['image_dir'], '--dest', tmp_path / 'x.npz', '--detector', tmp_path / 'flat.pkl',
                  '--device', 'cpu', env=setup['env'], check=False)
    line = error_line(res)
    assert 'flat.pkl' in line and '[N, D]' in line

def test_error_unreachable_default_detector(setup, tmp_path):
    import fid
    env = subprocess_env(DNNLIB_CACHE_DIR=tmp_path / 'empty-cache', HTTPS_PROXY=f'http://127.0.0.1:{free_port()}',
                         https_proxy=f'http://127.0.0.1:{free_port()}') # a proxy nobody listens on: offline
    for name in ('NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy'):
        env.pop(name, None)
    res = fid_cmd('ref', '--data', setup['image_dir'], '--dest', tmp_path / 'x.npz', '--device', 'cpu', '--workers', 0,
                  env=env, check=False)
    line = error_line(res)
    assert fid.DETECTOR_URL in line and '--detector' in line

def test_error_network_with_fewer_than_two_seeds(setup, tmp_path):
    pkl = write_network_pkl(tmp_path / 'net.pkl', make_tiny_net())
    res = fid_cmd('calc', '--network', pkl, '--seeds', '7', '--ref', setup['ref_npz'], '--detector', setup['detector_pkl'],
                  '--device', 'cpu', env=setup['env'], check=False)
    assert 'at least 2' in error_line(res)

#----------------------------------------------------------------------------

def test_ref_refuses_rank_deficient_statistics_unless_allowed(setup, tmp_path):
    # 10 images of 16-dimensional features: a covariance of rank at most 9, refused before any image is read.
    folder = write_folder(tmp_path / 'few', random_images(10))
    res = fid_cmd('ref', '--data', folder, '--dest', tmp_path / 'few.npz', '--detector', setup['detector_pkl'],
                  '--device', 'cpu', '--workers', 0, env=setup['env'], check=False)
    line = error_line(res)
    assert 'rank at most 9 for 16-dimensional features' in line and '--allow-rank-deficient' in line
    assert not os.path.exists(tmp_path / 'few.npz')
    fid_cmd('ref', '--data', folder, '--dest', tmp_path / 'few.npz', '--detector', setup['detector_pkl'], '--allow-rank-deficient',
            '--device', 'cpu', '--workers', 0, env=setup['env'])
    with np.load(tmp_path / 'few.npz') as data:
        singular_values = np.linalg.svd(data['sigma'], compute_uv=False)
    assert (singular_values[9:] < 1e-10 * singular_values[0]).all() # rank 9 up to round-off
