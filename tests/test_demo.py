"""The demo model: README's first command works offline, and the pickle is a real digits model."""

import os
import shlex
import textwrap

import numpy as np
import PIL.Image
import pytest

from conftest import ROOT, run_script

DEMO_PKL = os.path.join(ROOT, 'demo', 'edm-digits-16x16-cond.pkl')
EDM2_PKL = os.path.join(ROOT, 'demo', 'edm2-digits-16x16-cond.pkl')
EDM2_GUIDE = os.path.join(ROOT, 'demo', 'edm2-digits-16x16-guide.pkl')


def readme_first_command():
    """The generate command of README.md's first command (after its install step)."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        line = next(line for line in f if 'python generate.py' in line)
    return shlex.split(line.split('&&')[-1].strip())


def test_readme_first_command_generates_digits_and_a_grid_beside_them(tmp_path):
    args = readme_first_command()
    assert args[:2] == ['python', 'generate.py']
    options = dict(a.split('=', 1) for a in args[2:])
    outdir, grid = tmp_path / options['--outdir'], tmp_path / options['--grid'] # the README's own layout
    replace = {'--seeds': '--seeds=0-5', '--outdir': f'--outdir={outdir}', '--grid': f'--grid={grid}'}
    args = [replace.get(a.split('=')[0], a) for a in args[1:]]
    res = run_script(args)
    names = sorted(os.listdir(outdir))
    assert names == [f'{seed:06d}.png' for seed in range(6)] # the grid stays out: fid.py calc --images=<outdir> sees samples only
    for name in names:
        with PIL.Image.open(outdir / name) as image:
            assert image.mode == 'L' and image.size == (16, 16)
            pixels = np.asarray(image)
        assert pixels.std() > 20 # a digit on a dark background, not a flat image
    # A 3x2 grid of cells upscaled --grid-scale times, the same number of white pixels apart.
    scale = int(options.get('--grid-scale', 1))
    with PIL.Image.open(grid) as image:
        assert image.size == (3 * 16 * scale + 2 * scale, 2 * 16 * scale + scale)
    assert 'Wrote 6 images' in res.stdout


def test_demo_pickle_loads_in_fresh_process(tmp_path):
    script = textwrap.dedent(f'''
        import pickle, torch
        with open({DEMO_PKL!r}, 'rb') as f:
            data = pickle.load(f)
        net = data['ema']
        x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution])
        with torch.no_grad():
            out = net(x, torch.tensor([1.0, 1.0]), torch.eye(net.label_dim)[[3, 7]])
        print(type(net).__name__, net.img_resolution, net.img_channels, net.label_dim, tuple(out.shape), sorted(data))
    ''')
    out = run_script(['-c', script], cwd=str(tmp_path)).stdout.split(maxsplit=4)
    assert out[:4] == ['EDMPrecond', '16', '1', '10']
    assert 'ema' in out[4] and 'dataset_kwargs' in out[4]


@pytest.mark.parametrize('network,guide', [(DEMO_PKL, None), (EDM2_PKL, EDM2_GUIDE)], ids=['ddpmpp', 'edm2-autoguided'])
def test_demo_samples_are_recognisable_digits(network, guide):
    # The shipped models, loaded by the safe loader: the EDM2 one through the EDM2 release's sampler, guided by its guide.
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC
    import torch
    from demo.evaluate import sample_digits, to_digit_scale
    from training.network_io import load_network_pkl

    digits = load_digits()
    classifier = SVC(gamma=0.001, C=10).fit(digits.images.reshape(len(digits.images), -1), digits.target)
    net = load_network_pkl(network)
    guidance = dict(gnet=load_network_pkl(guide), guidance=1.2) if guide else {}
    images, classes = sample_digits(net, num=40, steps=12, device=torch.device('cpu'), batch=40, **guidance)
    accuracy = (classifier.predict(to_digit_scale(images)) == classes).mean()
    print(f'classifier accuracy on 40 samples of {os.path.basename(network)}: {accuracy:.3f}')
    assert accuracy >= 0.8

def test_evaluate_refuses_guidance_options_without_guidance():
    res = run_script(['demo/evaluate.py', '--network=demo/edm-digits-16x16-cond.pkl', '--gnet=demo/edm-digits-16x16-guide.pkl',
                      '--num=10', '--device=cpu'], check=False)
    assert res.returncode != 0 and 'Error: --gnet has no effect without --guidance' in res.stderr, res.stderr
