"""generate.py and example.py end to end on the CPU, with small pickled networks."""

import itertools
import os
import pickle
import re

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import example
import generate
from training import generation, image_io
from conftest import ROOT, free_port, make_tiny_net, run_script, run_torchrun, single_thread, subprocess_env, write_network_pkl

SEEDS = '0-4,1000'
SEED_LIST = [0, 1, 2, 3, 4, 1000]
LABEL_DIM = 4
FAST = ['--steps=2', '--device=cpu']

#----------------------------------------------------------------------------

one_thread = pytest.fixture(scope='module', autouse=True)(single_thread) # in-process runs use one thread, as the subprocesses do

@pytest.fixture(scope='module')
def pkls(tmp_path_factory):
    """Network pickles: conditional RGB, unconditional grayscale, and broken ones."""
    root = tmp_path_factory.mktemp('pkls')
    cond = write_network_pkl(root / 'cond.pkl', make_tiny_net(label_dim=LABEL_DIM))
    gray = write_network_pkl(root / 'gray.pkl', make_tiny_net(img_channels=1, seed=1))
    with open(root / 'noema.pkl', 'wb') as f:
        pickle.dump(dict(loss_fn=None), f)
    with open(root / 'notnet.pkl', 'wb') as f:
        pickle.dump(dict(ema=5), f)
    with open(cond, 'rb') as f:
        data = f.read()
    (root / 'truncated.pkl').write_bytes(data[:2000])
    assert b'return ' in data # the source code the pickle carries, made invalid at the same length
    (root / 'badsource.pkl').write_bytes(data.replace(b'return ', b'retur n', 1))
    return dict(cond=cond, gray=gray, noema=str(root / 'noema.pkl'), notnet=str(root / 'notnet.pkl'), badsource=str(root / 'badsource.pkl'), truncated=str(root / 'truncated.pkl'))

@pytest.fixture(scope='module')
def reference_run(pkls, tmp_path_factory):
    """One real process: 6 seeds in batches of 4, plus a grid."""
    outdir = tmp_path_factory.mktemp('reference_run')
    res = run_script(['generate.py', f'--network={pkls["cond"]}', f'--outdir={outdir / "images"}', f'--seeds={SEEDS}',
                      '--batch=4', f'--grid={outdir / "grid.png"}', *FAST])
    return dict(images=outdir / 'images', grid=outdir / 'grid.png', stdout=res.stdout)

def invoke(*args):
    """Run the click command in this process; stderr is kept apart from stdout."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError: # click >= 8.2 always keeps stderr apart
        runner = CliRunner()
    return runner.invoke(generate.main, [str(a) for a in args])

def run_ok(*args):
    res = invoke(*args)
    assert res.exit_code == 0, f'{args}: {res.output}\n{res.exception!r}'
    return res

def read_pngs(folder):
    """{file name: (mode, pixels)} of every PNG under `folder`, by path relative to it."""
    images = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with PIL.Image.open(os.path.join(root, name)) as image:
                images[os.path.relpath(os.path.join(root, name), folder)] = (image.mode, np.array(image))
    return images

def file_bytes(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}

def random_label(seed):
    """The class a seed draws (spec: randint(label_dim) after randn([C, H, W]) from the seed's own generator)."""
    gen = torch.Generator().manual_seed(seed % 2 ** 32)
    torch.randn([3, 8, 8], generator=gen)
    return int(torch.randint(LABEL_DIM, size=[], generator=gen))

#----------------------------------------------------------------------------

def test_one_png_per_seed(reference_run):
    images = read_pngs(reference_run['images'])
    assert sorted(images) == [f'{seed:06d}.png' for seed in SEED_LIST]
    assert all(mode == 'RGB' and pixels.shape == (8, 8, 3) for mode, pixels in images.values())
    assert len({pixels.tobytes() for _mode, pixels in images.values()}) == len(SEED_LIST) # one image per seed
    assert 'Wrote 6 images' in reference_run['stdout'] and 'images/s' in reference_run['stdout']
    assert not any(name.startswith('.') for name in os.listdir(reference_run['images'])) # no temporary files left

def test_grid_tiles_images_in_seed_order(reference_run):
    # 6 images -> 3 columns, 2 rows (as close to square as possible), row-major in seed order, one white pixel apart.
    with PIL.Image.open(reference_run['grid']) as image:
        grid = np.array(image)
    assert grid.shape == (2 * 8 + 1, 3 * 8 + 2, 3)
    assert (grid[8] == 255).all() and (grid[:, 8] == 255).all() and (grid[:, 17] == 255).all()
    images = read_pngs(reference_run['images'])
    for k, seed in enumerate(SEED_LIST):
        row, col = divmod(k, 3)
        np.testing.assert_array_equal(grid[row * 9 : row * 9 + 8, col * 9 : col * 9 + 8], images[f'{seed:06d}.png'][1])

def test_grid_scale_repeats_pixels(pkls, reference_run, tmp_path):
    # 4 images -> 2x2 cells of 3x3 = 24x24 pixels, 3 white pixels apart; every image pixel becomes a 3x3 block.
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path / "images"}', '--seeds=0-3', f'--grid={tmp_path / "grid.png"}', '--grid-scale=3', *FAST)
    with PIL.Image.open(tmp_path / 'grid.png') as image:
        grid = np.array(image)
    assert grid.shape == (2 * 24 + 3, 2 * 24 + 3, 3)
    assert (grid[24:27] == 255).all() and (grid[:, 24:27] == 255).all()
    images = read_pngs(reference_run['images'])
    for k in range(4):
        row, col = divmod(k, 2)
        cell = grid[row * 27 : row * 27 + 24, col * 27 : col * 27 + 24]
        np.testing.assert_array_equal(cell, np.kron(images[f'{k:06d}.png'][1], np.ones([3, 3, 1], dtype=np.uint8)))

def test_batch_size_does_not_change_images(pkls, reference_run, tmp_path):
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path}', f'--seeds={SEEDS}', '--batch=1', *FAST)
    assert file_bytes(tmp_path) == file_bytes(reference_run['images'])

def test_two_processes_match_one(pkls, reference_run, tmp_path):
    run_torchrun(['generate.py', f'--network={pkls["cond"]}', f'--outdir={tmp_path}', f'--seeds={SEEDS}', '--batch=2', *FAST], nproc=2)
    assert file_bytes(tmp_path) == file_bytes(reference_run['images'])

def test_subdirs_per_thousand_seeds(pkls, tmp_path):
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path}', '--seeds=998-1001', '--subdirs', *FAST)
    assert sorted(read_pngs(tmp_path)) == [os.path.join('000000', '000998.png'), os.path.join('000000', '000999.png'),
                                           os.path.join('001000', '001000.png'), os.path.join('001000', '001001.png')]

def test_one_channel_gives_grayscale_png(pkls, tmp_path):
    run_ok(f'--network={pkls["gray"]}', f'--outdir={tmp_path}', '--seeds=0-1', *FAST)
    assert [(mode, pixels.shape) for mode, pixels in read_pngs(tmp_path).values()] == [('L', (8, 8))] * 2

def test_class_overrides_random_label(pkls, tmp_path):
    # With --class=k a seed whose random label is k gives its usual image; a seed with another label changes.
    labels = {seed: random_label(seed) for seed in range(40)}
    k = labels[0]
    other = next(seed for seed, label in labels.items() if label != k)
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path / "random"}', f'--seeds=0,{other}', *FAST)
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path / "class"}', f'--seeds=0,{other}', f'--class={k}', *FAST)
    random, forced = file_bytes(tmp_path / 'random'), file_bytes(tmp_path / 'class')
    assert forced['000000.png'] == random['000000.png']
    assert forced[f'{other:06d}.png'] != random[f'{other:06d}.png']

def test_every_ablation_combination_runs(pkls, tmp_path):
    choices = [('--solver', [None, 'euler', 'heun']), ('--disc', [None, 'vp', 've', 'iddpm', 'edm']),
               ('--schedule', [None, 'vp', 've', 'linear']), ('--scaling', [None, 'vp', 'none'])]
    for combo in itertools.product(*[values for _name, values in choices]):
        flags = [f'{name}={value}' for (name, _values), value in zip(choices, combo) if value is not None]
        outdir = tmp_path / ('_'.join(flags) or 'default').replace('--', '').replace('=', '-')
        run_ok(f'--network={pkls["cond"]}', f'--outdir={outdir}', '--seeds=0-1', *FAST, *flags)
        assert sorted(os.listdir(outdir)) == ['000000.png', '000001.png'], flags
    # Heun + EDM steps + sigma(t) = t + no scaling is Algorithm 2, image for image.
    assert file_bytes(tmp_path / 'solver-heun_disc-edm_schedule-linear_scaling-none') == file_bytes(tmp_path / 'default')

def test_bf16_close_to_fp32(pkls, tmp_path):
    for precision in ['fp32', 'bf16']:
        run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path / precision}', '--seeds=0-7', '--device=cpu', f'--precision={precision}')
    fp32, bf16 = read_pngs(tmp_path / 'fp32'), read_pngs(tmp_path / 'bf16')
    mse = np.mean([np.mean((fp32[name][1].astype(float) - bf16[name][1].astype(float)) ** 2) for name in fp32])
    psnr = 10 * np.log10(255 ** 2 / max(mse, 1e-12))
    print(f'bf16 vs fp32 (18 steps, 8 images): PSNR = {psnr:.1f} dB')
    assert psnr > 35

def test_padded_batches_give_the_same_images():
    # With pad_batches (set by --compile) the short last batch runs at full size; the images stay those of its seeds.
    net = make_tiny_net(label_dim=LABEL_DIM)
    sizes = []
    net.register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    device = torch.device('cpu')
    runs = {}
    for pad in [False, True]:
        sizes.clear()
        sampler_net = generation.SamplerNet(net, 'cpu', pad_batches=pad)
        runs[pad] = list(generation.sample_batches(sampler_net, list(range(5)), device, max_batch_size=2, num_steps=2))
        assert sorted(set(sizes)) == ([2] if pad else [1, 2])
    assert [seeds for seeds, _ in runs[True]] == [[0, 1], [2, 3], [4]]
    for (seeds_a, images_a), (seeds_b, images_b) in zip(runs[False], runs[True]):
        assert seeds_a == seeds_b and images_a.shape == images_b.shape and np.array_equal(images_a, images_b)

@pytest.mark.parametrize('precond', ['EDMPrecond', 'iDDPMPrecond'])
@pytest.mark.parametrize('churn', [{}, dict(S_churn=40, S_min=0.05, S_max=50)], ids=['no-churn', 'churn'])
def test_images_are_the_samplers_with_per_seed_noise(precond, churn):
    # generate.py's images are edm_sampler's with the per-seed draws the spec gives (without churn, none are drawn).
    net = make_tiny_net(label_dim=LABEL_DIM, precond=precond)
    seeds = [0, 1, 1000]
    rnd = generate.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([3, 3, 8, 8])
    labels = torch.eye(LABEL_DIM)[rnd.randint(LABEL_DIM, size=[3])]
    calls = []
    randn_like = lambda x: calls.append(1) or rnd.randn_like(x)
    expected = generate.edm_sampler(net, latents, labels, randn_like=randn_like, num_steps=6, **churn)
    assert len(calls) == (6 if churn else 0)
    other_noise = generate.edm_sampler(net, latents, labels, num_steps=6, **churn) # global draws: the same only without churn
    assert torch.equal(other_noise, expected) != bool(churn)
    ((batch_seeds, images),) = generation.sample_batches(net, seeds, torch.device('cpu'), max_batch_size=3, num_steps=6, **churn)
    assert batch_seeds == seeds and np.array_equal(images, image_io.images_to_uint8(expected))
    if not churn: # the same bits as per-seed draws that gamma = 0 multiplies by zero (a churn window without steps)
        unused = dict(S_churn=40, S_min=1e6, S_max=2e6)
        assert torch.equal(generate.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=6, **unused), expected)

def test_compile_close_to_eager(pkls, tmp_path):
    # torch.compile (inductor on the CPU) through the command line; 3 seeds in batches of 2 compile one shape.
    run_ok(f'--network={pkls["cond"]}', f'--outdir={tmp_path / "eager"}', '--seeds=0-2', '--batch=2', *FAST)
    run_script(['generate.py', f'--network={pkls["cond"]}', f'--outdir={tmp_path / "compiled"}', '--seeds=0-2', '--batch=2',
                '--compile', *FAST])
    eager, compiled = read_pngs(tmp_path / 'eager'), read_pngs(tmp_path / 'compiled')
    assert sorted(compiled) == sorted(eager) == ['000000.png', '000001.png', '000002.png']
    mse = np.mean([np.mean((eager[name][1].astype(float) - compiled[name][1].astype(float)) ** 2) for name in eager])
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 40

def test_frozen_sampling_folds_the_weight_casts():
    # On CUDA, compiled sampling takes the weights as constants (inductor's freezing), so that their casts to
    # the autocast dtype are made once, at compilation: fewer kernels, outputs as close to float32. On the
    # CPU, prepare_network does not freeze (inductor's freezing there packs the weights for oneDNN); with
    # oneDNN off, it takes the passes it takes on CUDA.
    from torch._inductor import metrics
    x = torch.randn([4, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.full([4], 2.0), torch.eye(LABEL_DIM)
    with torch.no_grad():
        expected = generation.prepare_network(make_tiny_net(label_dim=LABEL_DIM), torch.device('cpu'))(x, sigma, labels)
    kernels, outputs = {}, {}
    for freeze in [False, True]:
        sampler_net = generation.prepare_network(make_tiny_net(label_dim=LABEL_DIM), torch.device('cpu'), precision='bf16', use_compile=True)
        assert not sampler_net.freeze
        sampler_net.freeze = freeze # before the first call, which compiles
        torch._dynamo.reset()
        metrics.reset()
        mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
        try:
            with torch.no_grad():
                outputs[freeze] = sampler_net(x, sigma, labels)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        kernels[freeze] = metrics.generated_kernel_count
    torch._dynamo.reset()
    assert 0 < kernels[True] < kernels[False], kernels
    rms = {freeze: (out - expected).square().mean().sqrt().item() for freeze, out in outputs.items()} # bf16's rounding
    assert rms[True] <= 1.5 * rms[False] and rms[False] < 0.01 * expected.abs().max(), rms

#----------------------------------------------------------------------------
# Clear one-line errors.

ERRORS = {
    'missing pickle':        (lambda p, d: [f'--network={d}/missing.pkl', f'--outdir={d}/out'], 'missing.pkl'),
    'truncated pickle':      (lambda p, d: [f'--network={p["truncated"]}', f'--outdir={d}/out'], 'truncated.pkl'),
    'invalid source code':   (lambda p, d: [f'--network={p["badsource"]}', f'--outdir={d}/out', '--allow-code'], 'badsource.pkl is not a readable network pickle (SyntaxError'),
    'pickle without ema':    (lambda p, d: [f'--network={p["noema"]}', f'--outdir={d}/out'], 'ema'),
    'ema not a network':     (lambda p, d: [f'--network={p["notnet"]}', f'--outdir={d}/out'], 'holds a int, not a preconditioned network'),
    'empty iddpm range':     (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--disc=iddpm', '--sigma_min=250', '--sigma_max=300'],
                              'sigma_min=250 and sigma_max=300'), # the iDDPM levels nearest are 214 and 321
    'class out of range':    (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', f'--class={LABEL_DIM}'], '--class'),
    'negative class':        (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--class=-1'], '--class'),
    'class for uncond net':  (lambda p, d: [f'--network={p["gray"]}', f'--outdir={d}/out', '--class=0'], 'unconditional'),
    'outdir is a file':      (lambda p, d: [f'--network={p["cond"]}', f'--outdir={p["cond"]}'], '--outdir'),
    'empty seed list':       (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--seeds='], '--seeds'),
    'reversed seed range':   (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--seeds=5-2'], '5-2'),
    'malformed seeds':       (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--seeds=1,x'], '--seeds'),
    'zero steps':            (lambda p, d: [f'--network={p["cond"]}', f'--outdir={d}/out', '--steps=0'], '--steps'),
}

@pytest.mark.parametrize('case', sorted(ERRORS))
def test_bad_input_gives_one_error_line(pkls, tmp_path, case):
    make_args, expected = ERRORS[case]
    res = invoke(*make_args(pkls, tmp_path), '--device=cpu')
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), f'uncaught {res.exception!r}' # a ClickException, not a traceback
    lines = [line for line in res.stderr.strip().splitlines() if '%|' not in line] # without the progress bar
    assert len(lines) == 1 and lines[0].startswith('Error: ') and expected in lines[0], res.stderr
    assert 'Traceback' not in res.stderr
    assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')

def test_clear_error_in_a_real_process(pkls, tmp_path):
    res = run_script(['generate.py', f'--network={pkls["cond"]}', f'--outdir={tmp_path}', f'--class={LABEL_DIM + 5}', '--device=cpu'], check=False)
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr and res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert f'--class={LABEL_DIM + 5}' in res.stderr

def test_unknown_device_names_the_option(pkls, tmp_path):
    res = invoke(f'--network={pkls["cond"]}', f'--outdir={tmp_path}/out', '--device=bogus')
    assert isinstance(res.exception, SystemExit) and res.exit_code != 0, f'uncaught {res.exception!r}'
    assert res.stderr.strip().splitlines() == ['Error: --device=bogus is not a device name (such as cpu, cuda, cuda:1 or mps)']

def test_grid_write_failure_names_the_grid(pkls, tmp_path):
    grid = f'{pkls["cond"]}/grid.png' # under a file
    res = invoke(f'--network={pkls["cond"]}', f'--outdir={tmp_path}/out', '--seeds=0-1', f'--grid={grid}', *FAST)
    assert isinstance(res.exception, SystemExit) and res.exit_code != 0, f'uncaught {res.exception!r}'
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f'Error: cannot write --grid {grid}: ') and 'Traceback' not in res.stderr, res.stderr

def test_write_failure_names_the_file_and_keeps_written_images(pkls, tmp_path):
    # Images are written by a thread while the next batch samples; its errors must still stop the run, cleanly.
    outdir = tmp_path / 'out'
    (outdir / '000005.png').mkdir(parents=True)
    (outdir / '000005.png' / 'keep').write_text('occupied')
    res = invoke(f'--network={pkls["cond"]}', f'--outdir={outdir}', '--seeds=0-11', '--batch=4', *FAST)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), f'uncaught {res.exception!r}'
    last = res.stderr.strip().splitlines()[-1] # after the progress bar
    assert last.startswith('Error: cannot write ') and last.endswith('000005.png: Is a directory'), res.stderr
    assert 'Traceback' not in res.stderr
    assert sorted(os.listdir(outdir)) == [f'{seed:06d}.png' for seed in range(6)] # images 0-4 and the occupied name; no temporary files


def test_failure_on_one_rank_stops_every_rank_cleanly(pkls, tmp_path):
    # Rank 1 cannot write seed 1's image; rank 0, waiting for it, stops too, and neither prints a traceback
    # (torchrun's launcher prints its own when a process fails).
    (tmp_path / '000001.png').mkdir()
    res = run_torchrun(['generate.py', f'--network={pkls["cond"]}', f'--outdir={tmp_path}', '--seeds=0-3', '--batch=1', *FAST],
                       nproc=2, check=False)
    assert res.returncode != 0 and f'File "{ROOT}' not in res.stderr, res.stderr
    errors = sorted(re.findall(r'(?<![A-Za-z])Error: [^\r\n]*', res.stderr)) # a progress bar may precede one on its line
    assert errors == ['Error: another process of this run stopped, so rank 0 stops too; its own error, if it printed one, says why',
                      f'Error: cannot write {tmp_path / "000001.png"}: Is a directory'], res.stderr

def test_example_names_unreachable_url(tmp_path):
    root = f'http://127.0.0.1:{free_port()}/edm/pretrained'
    res = run_script(['example.py', f'--model-root={root}', '--device=cpu', f'--outdir={tmp_path}'], check=False,
                     env=subprocess_env(DNNLIB_CACHE_DIR=tmp_path / 'cache'))
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr
    assert f'{root}/edm-cifar10-32x32-cond-vp.pkl' in res.stderr.strip().splitlines()[-1]
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.png')]

#----------------------------------------------------------------------------

def test_example_writes_the_samplers_grid(tmp_path):
    # The first published name as a local pickle, the others absent: its grid holds edm_sampler's 8x8 images of
    # one generator, row by row; then the first missing pickle is named in one line.
    pkl, grid_name, sampler_kwargs = example.MODELS[0]
    net = make_tiny_net(label_dim=LABEL_DIM)
    write_network_pkl(tmp_path / pkl, net)
    res = run_script(['example.py', f'--model-root={tmp_path}', '--device=cpu', f'--outdir={tmp_path}'], check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr
    assert str(tmp_path / example.MODELS[1][0]) in res.stderr.strip().splitlines()[-1]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn([64, 3, 8, 8], generator=gen)
    labels = torch.eye(LABEL_DIM)[torch.randint(LABEL_DIM, size=[64], generator=gen)]
    images = image_io.images_to_uint8(generate.edm_sampler(net, latents, labels, **sampler_kwargs))
    expected = images.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
    np.testing.assert_array_equal(np.array(PIL.Image.open(tmp_path / grid_name)), expected)
