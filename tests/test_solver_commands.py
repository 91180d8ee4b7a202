"""The low-step solvers through the command lines: generate.py and fid.py calc --network
write exactly what the solver functions give, each image depends only on its seed,
guidance works with every solver, the reference's own command lines keep their
images, and the NFE is shown. (Bad combinations: tests/test_validation.py.)"""

import os

import numpy as np
import PIL.Image
import pytest
import torch

import generate
from conftest import fixture_file, make_tiny_net, run_torchrun, single_thread, write_network_pkl
from test_validation import error_line, invoke
from training import generation, solvers
from training.network_io import load_network_data

one_thread = pytest.fixture(scope='module', autouse=True)(single_thread)

# One command line per solver, with options that reach each part of the translation to arguments.
SOLVER_CASES = {
    'euler':   (['--solver=euler', '--schedule=logsnr', '--steps=4'], dict(schedule='logsnr', num_steps=4)),
    'heun':    (['--solver=heun', '--schedule=edm', '--steps=3', '--rho=5'], dict(num_steps=3, rho=5)),
    'dpm_2':   (['--solver=dpm_2', '--steps=3', '--afs'], dict(num_steps=3, afs=True)),
    'ipndm':   (['--solver=ipndm', '--order=3', '--steps=5', '--denoise-to-zero'], dict(max_order=3, num_steps=5, denoise_to_zero=True)),
    'ipndm_v': (['--solver=ipndm_v', '--sigmas=80,10,2,0.5,0.002'], dict(sigmas=[80, 10, 2, 0.5, 0.002])),
    'deis':    (['--solver=deis', '--order=2', '--steps=5', '--sigma_min=0.01', '--sigma_max=50'], dict(max_order=2, num_steps=5, sigma_min=0.01, sigma_max=50)),
    'dpm_pp':  (['--solver=dpm_pp', '--schedule=time-uniform', '--rho=2', '--steps=5'], dict(schedule='time_uniform', rho=2, num_steps=5)),
    'unipc':   (['--solver=unipc', '--order=2', '--steps=5', '--afs'], dict(max_order=2, num_steps=5, afs=True)),
}
SEEDS = [0, 1, 2, 5, 7]

@pytest.fixture(scope='module')
def net_pkl(tmp_path_factory):
    return write_network_pkl(tmp_path_factory.mktemp('net') / 'net.pkl', make_tiny_net(label_dim=3))

def read_pngs(folder):
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder)) if name.endswith('.png')}

def run_generate(*args):
    res = invoke(generate.main, *args, '--device=cpu')
    assert res.exit_code == 0, res.output + res.stderr
    return res

#----------------------------------------------------------------------------

@pytest.mark.parametrize('solver', sorted(SOLVER_CASES))
def test_generate_writes_the_solver_functions_images(net_pkl, tmp_path, solver):
    options, kwargs = SOLVER_CASES[solver]
    res = run_generate(f'--network={net_pkl}', f'--outdir={tmp_path}', f'--seeds={",".join(map(str, SEEDS))}', '--batch=2', *options)
    nfe = solvers.num_evaluations(solver, len(kwargs['sigmas']) if 'sigmas' in kwargs else kwargs['num_steps'],
                                  kwargs.get('max_order'), kwargs.get('afs', False), kwargs.get('denoise_to_zero', False))
    assert f'NFE {nfe}' in res.stderr and f'NFE {nfe}).' in res.output # the progress bar and the final line

    # The same seeds through the solver function itself: latents and labels per seed, then the solver's arguments.
    net = load_network_data(net_pkl)['ema']
    expected = {}
    for seed in SEEDS:
        rnd = generation.StackedRandomGenerator('cpu', [seed])
        latents = rnd.randn([1, 3, 8, 8])
        labels = torch.eye(3)[rnd.randint(3, size=[1])]
        image = solvers.SOLVERS[solver](net, latents, labels, randn_like=rnd.randn_like, **kwargs)
        expected[f'{seed:06d}.png'] = generation.images_to_uint8(image)[0]
    written = read_pngs(tmp_path)
    assert sorted(written) == sorted(expected)
    for name, image in expected.items():
        np.testing.assert_array_equal(written[name], image, err_msg=name)

def test_an_image_depends_only_on_its_seed(net_pkl, tmp_path):
    # Any batch size, any subset of seeds, one or two processes: the same image for each seed.
    options = ['--solver=unipc', '--steps=5', f'--network={net_pkl}']
    run_generate(*options, f'--outdir={tmp_path / "b1"}', '--seeds=0-5', '--batch=1')
    run_generate(*options, f'--outdir={tmp_path / "b4"}', '--seeds=0-5', '--batch=4')
    run_generate(*options, f'--outdir={tmp_path / "some"}', '--seeds=4,1', '--batch=2')
    run_torchrun(['generate.py', *options, f'--outdir={tmp_path / "two"}', '--seeds=0-5', '--batch=2', '--device=cpu'])
    one = read_pngs(tmp_path / 'b1')
    assert len(one) == 6
    for folder in ['b4', 'some', 'two']:
        for name, image in read_pngs(tmp_path / folder).items():
            np.testing.assert_array_equal(image, one[name], err_msg=f'{folder}/{name}')

@pytest.mark.parametrize('solver', sorted(SOLVER_CASES))
def test_guidance_with_every_solver(net_pkl, tmp_path, solver):
    # Autoguidance by a second network changes the images; weight 1 is no guidance, image for image.
    gnet_pkl = write_network_pkl(tmp_path / 'gnet.pkl', make_tiny_net(label_dim=3, seed=1))
    options = [f'--network={net_pkl}', '--seeds=0-1', *SOLVER_CASES[solver][0]]
    run_generate(*options, f'--outdir={tmp_path / "plain"}')
    run_generate(*options, f'--outdir={tmp_path / "w1"}', '--guidance=1')
    res = run_generate(*options, f'--outdir={tmp_path / "guided"}', '--guidance=2', f'--gnet={gnet_pkl}', '--guidance-interval=0.1,50')
    plain, w1, guided = (read_pngs(tmp_path / name) for name in ['plain', 'w1', 'guided'])
    assert all(np.array_equal(plain[name], w1[name]) for name in plain)
    assert all(not np.array_equal(plain[name], guided[name]) for name in plain)
    assert 'Wrote 2 images' in res.output

def test_reference_command_lines_keep_their_sampler(net_pkl, tmp_path):
    # --solver=euler|heun alone is the reference's ablation sampler (Euler: N steps to sigma = 0, N evaluations);
    # with an option of the low-step solvers it is the solver of training/solvers.py (N - 1 steps to sigma_min).
    res = run_generate(f'--network={net_pkl}', f'--outdir={tmp_path / "ablation"}', '--seeds=0-1', '--solver=euler', '--steps=4')
    assert 'NFE 4)' in res.output
    res = run_generate(f'--network={net_pkl}', f'--outdir={tmp_path / "fast"}', '--seeds=0-1', '--solver=euler', '--steps=4', '--schedule=edm')
    assert 'NFE 3)' in res.output
    ablation, fast = read_pngs(tmp_path / 'ablation'), read_pngs(tmp_path / 'fast')
    assert any(not np.array_equal(ablation[name], fast[name]) for name in ablation)

    # --solver=edm and --schedule=edm are the default sampler's own names: the default images.
    run_generate(f'--network={net_pkl}', f'--outdir={tmp_path / "default"}', '--seeds=0-1', '--steps=4')
    run_generate(f'--network={net_pkl}', f'--outdir={tmp_path / "named"}', '--seeds=0-1', '--steps=4', '--solver=edm', '--schedule=edm')
    default, named = read_pngs(tmp_path / 'default'), read_pngs(tmp_path / 'named')
    assert all(np.array_equal(default[name], named[name]) for name in default)

def test_edm2_network_with_a_low_step_solver(tmp_path):
    # An EDM2 release pickle: its own sampler by default; a solver of training/solvers.py when named, guided as edm2
    # guides (by the network itself without --gnet) and with a guidance interval.
    pkl = fixture_file('edm2-img16-rgb-cond.pkl')
    res = run_generate(f'--network={pkl}', f'--outdir={tmp_path / "ipndm"}', '--seeds=0-2', '--solver=ipndm', '--steps=6')
    assert 'NFE 5)' in res.output and len(read_pngs(tmp_path / 'ipndm')) == 3
    run_generate(f'--network={pkl}', f'--outdir={tmp_path / "guided"}', '--seeds=0-2', '--solver=ipndm', '--steps=6',
                 f'--gnet={pkl}', '--guidance=2', '--guidance-interval=0.5,10')
    res = invoke(generate.main, f'--network={pkl}', f'--outdir={tmp_path / "x"}', '--seeds=0', '--guidance=2', '--guidance-interval=0.5,10', '--device=cpu')
    assert '--guidance-interval needs a low-step --solver' in error_line(res)
    res = invoke(generate.main, f'--network={pkl}', f'--outdir={tmp_path / "x"}', '--seeds=0', '--disc=vp', '--device=cpu')
    assert 'not the ablation sampler' in error_line(res)

#----------------------------------------------------------------------------
