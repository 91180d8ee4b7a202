"""Validated input: sampler options of generate.py and fid.py, labels of
datasets, hostile files (huge PNG headers, huge zip members, FIFOs, devices),
FID statistics; and generate.py's progress bar. Each bad input gives one
'Error:' line naming the option or file, before any work is done."""

import gzip
import io
import json
import os
import struct
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
import generate
from conftest import make_tiny_net, run_script, single_thread, write_network_pkl
from training.dataset import ImageFolderDataset
from training.sampling import edm_sampler, edm_sigma_steps

#----------------------------------------------------------------------------
# Helpers.

one_thread = pytest.fixture(scope='module', autouse=True)(single_thread)

@pytest.fixture(scope='module')
def net_pkl(tmp_path_factory):
    """A small EDM network (sigma_min 0, sigma_max inf: every limit comes from the options)."""
    return write_network_pkl(tmp_path_factory.mktemp('net') / 'net.pkl', make_tiny_net(label_dim=2))

def invoke(command, *args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError: # click >= 8.2 always keeps stderr apart
        runner = CliRunner()
    return runner.invoke(command, [str(a) for a in args])

def error_line(res):
    """The one 'Error: ...' line of a command that failed through click, without a traceback."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f'uncaught {res.exception!r}'
    lines = [line for line in res.stderr.splitlines() if line.startswith('Error: ')] # not the progress bars
    assert len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr
    return lines[0]

def png_bytes(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png')
    return buf.getvalue()

def write_pngs(folder, names, size=4):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(png_bytes(rng.integers(0, 256, [size, size, 3], dtype=np.uint8)))
    return str(folder)

def huge_png_header(width, height):
    """The first bytes of an 8-bit grayscale PNG of width x height: signature, IHDR, the start of an IDAT."""
    def chunk(kind, payload):
        return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(bytes(width + 1) * 64))

#----------------------------------------------------------------------------
# Sampler options.

SAMPLER_ERRORS = {
    # Checked before the network is loaded (the pickle does not exist).
    'sigma_min nan':     (['--sigma_min=nan'], '--sigma_min must be positive, got nan'),
    'rho nan':           (['--rho=nan'], '--rho must be a finite number'),
    'rho inf':           (['--rho=inf'], '--rho must be a finite number'),
    'S_noise nan':       (['--S_noise=nan'], '--S_noise must be a finite number'),
    'S_noise inf':       (['--S_noise=inf'], '--S_noise must be a finite number'),
    'S_churn inf':       (['--S_churn=inf'], '--S_churn must be a finite number'),
    'S_min nan':         (['--S_min=nan'], '--S_min must be a finite number'),
    'S_max nan':         (['--S_max=nan'], '--S_max must be a number'),
    'too many steps':    (['--steps=10001'], '--steps must be an integer from 1 to 10000'),
    'too many seeds':    (['--seeds=0-999999999999'], '--seeds: more than 33554432 numbers'),
    # Low-step solvers: a wrong combination of options.
    'order of euler':    (['--solver=euler', '--order=2'], '--order: --solver=euler has a single order'),
    'order too high':    (['--solver=ipndm', '--order=5'], '--order of --solver=ipndm must be one of 2, 3, 4, got 5'),
    'order of dpm_pp':   (['--solver=dpm_pp', '--order=4'], '--order of --solver=dpm_pp must be one of 1, 2, 3, got 4'),
    'churn, fast':       (['--solver=unipc', '--S_churn=40'], '--S_churn: churn is an option of --solver=edm; --solver=unipc is deterministic'),
    'ablation, fast':    (['--solver=deis', '--disc=vp'], '--disc: options of the ablation sampler'),
    'ablation schedule': (['--solver=ipndm', '--schedule=vp'], '--schedule: options of the ablation sampler'),
    'afs without solver': (['--afs'], '--afs: options of the low-step solvers; give --solver='),
    'order, edm':        (['--solver=edm', '--order=3'], '--order: options of the low-step solvers'),
    'logsnr, edm':       (['--schedule=logsnr'], '--schedule: options of the low-step solvers'),
    'edm, ablation':     (['--solver=edm', '--disc=vp'], '--disc: options of the ablation sampler, which takes --solver=euler|heun'),
    'one step, fast':    (['--solver=ipndm', '--steps=1'], '--steps of --solver=ipndm must be at least 2'),
    'rho with logsnr':   (['--solver=ipndm', '--schedule=logsnr', '--rho=3'], '--rho has no effect with --schedule=logsnr'),
    'sigmas and steps':  (['--solver=ipndm', '--sigmas=80,1,0.002', '--steps=5'], '--sigmas gives the noise levels; it takes no --steps'),
    'sigmas increasing': (['--solver=ipndm', '--sigmas=0.002,1,80'], '--sigmas must be at least two finite, positive, strictly decreasing'),
    'sigmas one':        (['--solver=ipndm', '--sigmas=80'], '--sigmas must be at least two'),
    'sigmas zero':       (['--solver=unipc', '--sigmas=80,1,0'], '--sigmas must be at least two'),
    'sigmas nan':        (['--solver=unipc', '--sigmas=80,nan,1'], '--sigmas must be at least two'),
    'sigmas inf':        (['--solver=unipc', '--sigmas=inf,1'], '--sigmas must be at least two'),
    'sigmas text':       (['--solver=unipc', '--sigmas=80,,1'], '--sigmas must be at least two'),
    'sigmas repeated':   (['--solver=euler', '--sigmas=80,1,1'], '--sigmas must be at least two'),
}
NET_ERRORS = {
    # Checked once the network's own limits are known (this one has sigma_max = inf).
    'sigma_max inf':     (['--sigma_max=inf'], '--sigma_max is inf within the network\'s noise levels [0, inf]'),
    'min above max':     (['--sigma_min=10', '--sigma_max=5'], '--sigma_min must be below --sigma_max, got 10 and 5'),
    'min above default': (['--sigma_min=100'], '--sigma_min must be below --sigma_max, got 100 and 80'),
    'ablation vp range': (['--disc=vp', '--sigma_min=200'], '--sigma_min must be below --sigma_max, got 200 and 152'),
}

@pytest.mark.parametrize('case', sorted(SAMPLER_ERRORS))
def test_generate_rejects_bad_options_before_loading(tmp_path, case):
    options, expected = SAMPLER_ERRORS[case]
    res = invoke(generate.main, f'--network={tmp_path}/absent.pkl', f'--outdir={tmp_path}/out', '--device=cpu', *options)
    assert expected in error_line(res)
    assert not os.path.exists(tmp_path / 'out')

@pytest.mark.parametrize('case', sorted(NET_ERRORS))
def test_generate_rejects_bad_noise_range_before_sampling(net_pkl, tmp_path, case):
    options, expected = NET_ERRORS[case]
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}/out', '--device=cpu', *options)
    assert expected in error_line(res)
    assert not os.path.exists(tmp_path / 'out')

@pytest.mark.parametrize('options, expected', [(['--rho=nan'], '--rho'), (['--sigma_max=inf'], '--sigma_max is inf'),
                                               (['--seeds=0-999999999999'], '--seeds'), (['--steps=20000'], '--steps'),
                                               (['--solver=ipndm', '--order=7'], '--order'), (['--solver=unipc', '--sigmas=1,2'], '--sigmas'),
                                               (['--solver=deis', '--S_churn=1'], '--S_churn')])
def test_fid_calc_network_rejects_the_same_options(net_pkl, tmp_path, options, expected):
    # A valid reference and a detector that does not exist: the check comes before the detector is loaded.
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(16), sigma=np.eye(16))
    res = invoke(fid.main, 'calc', f'--network={net_pkl}', f'--ref={tmp_path}/ref.npz', '--device=cpu',
                 f'--detector={tmp_path}/absent.pkl', *options)
    assert expected in error_line(res)

def test_small_rho_gives_the_exact_steps():
    # rho = 0.001 overflows sigma_max^(1/rho) = 80^1000 in float64, and below about 0.3 sigma_min^(1/rho) vanishes
    # beside it; the steps must still follow eq. 5, here evaluated with 5000 decimal digits (80^1000 has 1904).
    import mpmath # pylint: disable=import-outside-toplevel
    with mpmath.workdps(5000):
        for rho in [0.001, 0.01, 0.1, 0.5, 3, 7]:
            steps = edm_sigma_steps(6, 0.002, 80, rho).tolist()
            inv = 1 / mpmath.mpf(rho)
            a, b = mpmath.mpf(80) ** inv, mpmath.mpf(0.002) ** inv
            expected = [float((a + mpmath.mpf(i) / 5 * (b - a)) ** mpmath.mpf(rho)) for i in range(6)]
            np.testing.assert_allclose(steps, expected, rtol=1e-12, err_msg=f'rho={rho}')

def test_default_rho_steps_are_the_reference_formula_to_the_bit():
    fractions = torch.arange(18, dtype=torch.float64) / 17
    expected = (80 ** (1 / 7) + fractions * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 # the reference's line
    assert torch.equal(edm_sigma_steps(18, 0.002, 80, 7), expected)

def test_small_rho_samples_finite_images():
    net = make_tiny_net()
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    for rho in [0.001, 0.1]:
        assert torch.isfinite(edm_sampler(net, latents, num_steps=3, rho=rho)).all()

#----------------------------------------------------------------------------
# generate.py's progress and grid.

def test_progress_counts_network_evaluations(net_pkl, tmp_path):
    # 3 seeds in batches of 2 with 3 steps: 2 batches x 5 evaluations (Heun, none on the last step).
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}', '--seeds=0-2', '--batch=2', '--steps=3', '--device=cpu')
    assert res.exit_code == 0, res.output
    assert '10/10' in res.stderr and 'eval' in res.stderr and '/1 ' not in res.stderr
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}', '--seeds=0-2', '--batch=2', '--steps=3',
                 '--solver=euler', '--device=cpu')
    assert '6/6' in res.stderr # Euler: 3 evaluations per batch
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}', '--seeds=0-2', '--batch=2', '--steps=3',
                 f'--gnet={net_pkl}', '--guidance=2', '--device=cpu')
    assert res.exit_code == 0 and '20/20' in res.stderr, res.output # autoguidance: D0 beside each D1
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}', '--seeds=0-2', '--batch=2', '--steps=4',
                 '--solver=ipndm', '--device=cpu')
    assert res.exit_code == 0 and 'NFE 3' in res.stderr and '6/6' in res.stderr, res.output # iPNDM: N - 1 evaluations

@pytest.mark.parametrize('option', ['--gnet', '--guidance-interval'])
def test_guidance_options_without_guidance_are_an_error(net_pkl, tmp_path, option):
    value = {'--gnet': net_pkl, '--guidance-interval': '0.1,1'}[option]
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0', f'{option}={value}', '--device=cpu')
    assert res.exit_code == 1 and error_line(res) == f'Error: {option} has no effect without --guidance (a weight other than 1)'
    assert not os.path.exists(tmp_path / 'out')

def test_grid_scale_below_one_is_refused(net_pkl, tmp_path):
    res = invoke(generate.main, f'--network={net_pkl}', f'--outdir={tmp_path}', '--grid-scale=0', '--grid=g.png')
    assert res.exit_code == 2 and '--grid-scale' in res.stderr

#----------------------------------------------------------------------------
# Dataset labels: dataset_tool.py and ImageFolderDataset.

LABEL_ERRORS = {
    'missing file':  ([['a.png', 0], ['b.png', 1], ['c.png', 1]], 'labels c.png, which is not one of its images'),
    'some images':   ([['a.png', 0]], 'has no label for b.png (1 of 2 images lack one)'),
    'string':        ([['a.png', 0], ['b.png', '3']], 'b.png: label "3" is not a class id'),
    'float':         ([['a.png', 3.0], ['b.png', 1]], 'a.png: label 3.0 is not a class id'),
    'bool':          ([['a.png', True], ['b.png', 1]], 'a.png: label true is not a class id'),
    'negative':      ([['a.png', 0], ['b.png', -1]], 'b.png: label -1 is not a class id'),
    'huge':          ([['a.png', 1000000000], ['b.png', 1]], 'a.png: label 1000000000 is not a class id (an integer from 0 to 99999)'),
}

@pytest.mark.parametrize('case', sorted(LABEL_ERRORS))
def test_dataset_tool_names_the_bad_label(tmp_path, case):
    labels, expected = LABEL_ERRORS[case]
    src = write_pngs(tmp_path / 'src', ['a.png', 'b.png'])
    with open(os.path.join(src, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=labels), f)
    line = error_line(invoke(dataset_tool.main, '--source', src, '--dest', tmp_path / 'out.zip'))
    assert f'{src}/dataset.json' in line and expected in line
    assert not os.path.exists(tmp_path / 'out.zip')

    # The same zip made by hand: the dataset refuses it when the labels are first needed.
    with zipfile.ZipFile(tmp_path / 'hand.zip', 'w') as z:
        for name in ['a.png', 'b.png']:
            z.write(os.path.join(src, name), name)
        z.writestr('dataset.json', json.dumps(dict(labels=labels)))
    dataset = ImageFolderDataset(str(tmp_path / 'hand.zip'), use_labels=True)
    with pytest.raises(ValueError) as err:
        dataset.label_dim # before allocating the one-hot labels
    assert f'{tmp_path}/hand.zip/dataset.json' in str(err.value) and expected in str(err.value)

def test_dataset_keeps_valid_labels(tmp_path):
    src = write_pngs(tmp_path / 'src', ['a.png', 'b.png'])
    with open(os.path.join(src, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=[['a.png', 99999], ['b.png', 0]]), f)
    assert invoke(dataset_tool.main, '--source', src, '--dest', tmp_path / 'out.zip').exit_code == 0
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    assert dataset.label_dim == 100000 and dataset.get_label(0)[99999] == 1 and dataset.get_label(1)[0] == 1

def test_cifar10_label_out_of_range(tmp_path):
    from test_dataset_tool import write_cifar10
    import pickle, tarfile
    write_cifar10(tmp_path / 'cifar-10-python.tar.gz', [2, 2, 2, 2, 2], np.random.default_rng(0))
    # Rewrite batch 3 with a label 10.
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz') as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    batch = pickle.loads(members['cifar-10-batches-py/data_batch_3'], encoding='latin1')
    batch['labels'][1] = 10
    members['cifar-10-batches-py/data_batch_3'] = pickle.dumps(batch, protocol=2)
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    line = error_line(invoke(dataset_tool.main, '--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip'))
    assert 'data_batch_3: label 10 of image 1 is not a CIFAR-10 class (0 to 9)' in line
    assert not os.path.exists(tmp_path / 'out.zip')

@pytest.mark.parametrize('rows, label, expected', [(28, 12, 'train-labels-idx1-ubyte.gz: label 12 of image 1 is not an MNIST digit'),
                                                   (0, 1, 'train-images-idx3-ubyte.gz: its header announces 0x28 images')])
def test_mnist_bad_label_or_header(tmp_path, rows, label, expected):
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, 2, rows, 28) + bytes(2 * rows * 28))
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 0x801, 2) + bytes([3, label]))
    line = error_line(invoke(dataset_tool.main, '--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'out.zip'))
    assert expected in line

#----------------------------------------------------------------------------
# Hostile files.

def test_huge_png_header_refused_before_decoding(tmp_path):
    # 20000x20000 = 4e8 pixels, beyond Pillow's 2 * MAX_IMAGE_PIXELS; pyspng, which has no limit, must not see it.
    assert 20000 * 20000 > 2 * PIL.Image.MAX_IMAGE_PIXELS
    src = write_pngs(tmp_path / 'src', ['a.png'])
    (tmp_path / 'src' / 'b.png').write_bytes(huge_png_header(20000, 20000))
    line = error_line(invoke(dataset_tool.main, '--source', src, '--dest', tmp_path / 'out.zip'))
    assert f'{src}/b.png: 20000x20000 pixels, more than the' in line
    dataset = ImageFolderDataset(src)
    with pytest.raises(ValueError, match=r'b\.png: 20000x20000 pixels'):
        dataset[1]

def test_huge_zip_member_refused_before_reading(tmp_path):
    # A member whose central directory entry claims 2 GiB uncompressed (zipfile reads up to that size).
    src = write_pngs(tmp_path / 'src', ['a.png', 'b.png'])
    with zipfile.ZipFile(tmp_path / 'bomb.zip', 'w') as z:
        for name in ['a.png', 'b.png']:
            z.write(os.path.join(src, name), name)
    data = bytearray((tmp_path / 'bomb.zip').read_bytes())
    entry = data.rindex(b'PK\x01\x02') # central directory entry of b.png
    data[entry + 24 : entry + 28] = struct.pack('<I', 1 << 31)
    (tmp_path / 'bomb.zip').write_bytes(bytes(data))
    line = error_line(invoke(dataset_tool.main, '--source', tmp_path / 'bomb.zip', '--dest', tmp_path / 'out.zip'))
    assert f'{tmp_path}/bomb.zip:b.png: 2147483648 bytes uncompressed, more than the 1024 MiB' in line
    dataset = ImageFolderDataset(str(tmp_path / 'bomb.zip'))
    with pytest.raises(ValueError, match=r'b\.png: 2147483648 bytes uncompressed'):
        dataset[1]

@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs FIFOs')
def test_fifo_and_device_files_are_refused_by_name(tmp_path):
    # In a child process with a time limit: reading a FIFO would block, /dev/zero would never end.
    src = write_pngs(tmp_path / 'src', ['a.png'])
    os.mkfifo(tmp_path / 'src' / 'b.png')
    res = run_script(['dataset_tool.py', '--source', src, '--dest', tmp_path / 'out.zip'], check=False, timeout=60)
    assert f'Error: {src}/b.png is a FIFO, not a regular file' in res.stderr and res.returncode != 0
    os.remove(tmp_path / 'src' / 'b.png')
    os.symlink('/dev/zero', tmp_path / 'src' / 'b.png')
    res = run_script(['dataset_tool.py', '--source', src, '--dest', tmp_path / 'out.zip'], check=False, timeout=60)
    assert f'Error: {src}/b.png is a character device, not a regular file' in res.stderr
    os.symlink('/dev/zero', tmp_path / 'cifar-10-python.tar.gz')
    res = run_script(['dataset_tool.py', '--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip'], check=False, timeout=60)
    assert 'cifar-10-python.tar.gz is a character device, not a regular file' in res.stderr
    code = ('import sys; from training.dataset import ImageFolderDataset; d = ImageFolderDataset(sys.argv[1])\n'
            'try: d[1]\nexcept ValueError as err: print(err)')
    res = run_script(['-c', code, src], timeout=60)
    assert f'{src}/b.png is a character device, not a regular file' in res.stdout
    assert not os.path.exists(tmp_path / 'out.zip')

def test_a_huge_resolution_is_refused(tmp_path):
    src = write_pngs(tmp_path / 'src', ['a.png'])
    line = error_line(invoke(dataset_tool.main, '--source', src, '--dest', tmp_path / 'out.zip', '--resolution=20000x20000'))
    assert '--resolution 20000x20000 is too large: at most 16384' in line

#----------------------------------------------------------------------------
# FID statistics.

BAD_STATS = {
    'nan mu':         (lambda: (np.array([0, np.nan, 0.0]), np.eye(3)), 'infinite or NaN'),
    'inf sigma':      (lambda: (np.zeros(3), np.diag([1, np.inf, 1.0])), 'infinite or NaN'),
    'asymmetric':     (lambda: (np.zeros(3), np.eye(3) + np.triu(np.ones([3, 3]), 1) * 0.5), 'not symmetric'),
    'indefinite':     (lambda: (np.zeros(3), np.diag([1.0, -0.5, 1.0])), 'not positive semi-definite'),
    'strings':        (lambda: (np.array(['a', 'b', 'c']), np.eye(3)), 'real numbers'),
}

@pytest.mark.parametrize('case', sorted(BAD_STATS))
def test_reference_statistics_checked_on_load(tmp_path, case):
    make, expected = BAD_STATS[case]
    mu, sigma = make()
    np.savez(tmp_path / 'ref.npz', mu=mu, sigma=sigma)
    with pytest.raises(ValueError) as err:
        fid.load_stats(str(tmp_path / 'ref.npz'), verbose=False)
    assert str(err.value).startswith(f'{tmp_path}/ref.npz: ') and expected in str(err.value)
    # Before any image is read: --images names a folder that does not exist.
    line = error_line(invoke(fid.main, 'calc', f'--images={tmp_path}/absent', f'--ref={tmp_path}/ref.npz', '--device=cpu'))
    assert 'ref.npz' in line and expected in line

def test_valid_statistics_pass_including_rank_deficient_and_float32():
    features = np.random.default_rng(0).normal(size=[5, 8])
    sigma = np.cov(features, rowvar=False) # rank 4 of 8: eigenvalues zero up to round-off
    fid.check_stats(features.mean(0), sigma, 'x')
    fid.check_stats(features.mean(0).astype(np.float32), sigma.astype(np.float32), 'x')

def test_printed_fid_is_never_negative(capsys):
    fid._print_fid(-1e-12, scale=1.0)
    fid._print_fid(-0.5, scale=1.0)
    out, err = capsys.readouterr()
    assert out.split() == ['0', '0']
    assert err.count('Warning') == 1 and '-0.5' in err
