"""The researcher's loop on real short CPU runs: a sample grid with each
snapshot (the images generate.py draws for the same seeds), stats.jsonl as a
plot and as TensorBoard events, and continuing a stopped run with one
command: the same command again, or the command printed at the stop."""

import glob
import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT, run_script, subprocess_env

#----------------------------------------------------------------------------
# A tiny labelled dataset (8x8 RGB, 4 classes) and a tiny network: 32 steps of 32 images per kimg.

def _png(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png', compress_level=0)
    return buf.getvalue()

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'tiny8cond.zip'
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(16):
            z.writestr(f'00000/img{i:08d}.png', _png(rnd.randint(0, 256, size=[8, 8, 3], dtype=np.uint8)))
        z.writestr('dataset.json', json.dumps({'labels': [[f'00000/img{i:08d}.png', i % 4] for i in range(16)]}))
    return str(path)

TINY = ['--cond=1', '--cbase=8', '--cres=1,2', '--batch=32', '--tick=1', '--snap=1', '--dump=1', '--augment=0', '--workers=0', '--device=cpu']

def train_args(outdir, data_path, *extra):
    return ['train.py', f'--outdir={outdir}', f'--data={data_path}'] + TINY + list(extra)

def run_dirs(outdir):
    return sorted(glob.glob(os.path.join(str(outdir), '0*')))

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]

def assert_same_state(path_a, path_b):
    a, b = (torch.load(path, map_location='cpu', weights_only=False) for path in (path_a, path_b))
    assert a['cur_nimg'] == b['cur_nimg']
    for key in ('net', 'ema'):
        sa, sb = a[key].state_dict(), b[key].state_dict()
        different = [name for name in sa if not torch.equal(sa[name], sb[name])]
        assert not different, f'{key}: {len(different)} tensors differ, e.g. {different[:3]}'

def start_and_interrupt(args, signum=signal.SIGINT):
    """Run `python args...`, send `signum` once the first tick line appears; (returncode, whole output)."""
    proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('tick 0'):
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, ''.join(lines) + rest

#----------------------------------------------------------------------------
# Progress: sample grids, stats.jsonl plotted, TensorBoard.

@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """One uninterrupted 2-kimg run, seed 0 (with TensorBoard events where the package is installed)."""
    outdir = tmp_path_factory.mktemp('run')
    res = run_script(train_args(outdir, data, '--duration=0.002', '--seed=0', '--tensorboard'))
    (run_dir,) = run_dirs(outdir)
    return dict(run_dir=run_dir, stdout=res.stdout)

def test_each_snapshot_has_a_sample_grid_of_generate_images(run, tmp_path):
    for kimg in range(3):
        assert os.path.isfile(os.path.join(run['run_dir'], f'samples-{kimg:06d}.png'))
    grid = np.asarray(PIL.Image.open(os.path.join(run['run_dir'], 'samples-000002.png')))
    assert grid.shape == (4 * 9 - 1, 4 * 9 - 1, 3) # 4x4 cells of 8x8 on the CPU, one white pixel apart (as generate.py --grid)
    assert (grid[8::9] == 255).all() and (grid[:, 8::9] == 255).all()
    # The cells are generate.py's images of seeds 0-15 (labels drawn per seed) at 16 steps, row by row.
    run_script(['generate.py', f'--network={os.path.join(run["run_dir"], "network-snapshot-000002.pkl")}', f'--outdir={tmp_path}',
                '--seeds=0-15', '--steps=16', '--batch=16', '--device=cpu'])
    for seed in range(16):
        cell = grid[(seed // 4) * 9:(seed // 4) * 9 + 8, (seed % 4) * 9:(seed % 4) * 9 + 8]
        image = np.asarray(PIL.Image.open(tmp_path / f'{seed:06d}.png'))
        assert np.abs(cell.astype(int) - image.astype(int)).max() <= 1, seed
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 16 # images, not a blank grid
    assert not glob.glob(os.path.join(run['run_dir'], '.*')) # written atomically: no temporary files left

def test_stats_jsonl_holds_one_line_per_tick_with_the_documented_keys(run):
    stats = read_jsonl(os.path.join(run['run_dir'], 'stats.jsonl'))
    assert [line['Progress/tick']['mean'] for line in stats] == [0, 1, 2]
    for key in ['Progress/kimg', 'Progress/lr', 'Loss/loss', 'Timing/sec_per_kimg', 'Timing/total_sec', 'Resources/cpu_mem_gb']:
        assert set(stats[-1][key]) == {'num', 'mean', 'std'}
    assert stats[1]['Loss/loss']['num'] == 32 * 32 * 3 * 8 * 8 # tick 1 (32 to 1056 images): 32 steps of 32 images, per pixel
    assert stats[0]['timestamp'] < stats[-1]['timestamp']

def test_plot_stats_draws_a_png(run, tmp_path):
    dest = tmp_path / 'plot.png'
    res = run_script(['plot_stats.py', f'--run={run["run_dir"]}', f'--dest={dest}'])
    assert str(dest) in res.stdout
    with PIL.Image.open(dest) as image:
        assert image.format == 'PNG' and image.size[0] > 200 and image.size[1] > 200
    run_script(['plot_stats.py', f'--run={run["run_dir"]}']) # default: stats.png in the run folder
    assert os.path.isfile(os.path.join(run['run_dir'], 'stats.png'))

def test_plot_stats_without_matplotlib_says_so(run, tmp_path):
    (tmp_path / 'matplotlib.py').write_text('raise ImportError("No module named matplotlib")\n') # shadows an installed one
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    res = run_script(['plot_stats.py', f'--run={run["run_dir"]}'], check=False, env=env)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ['Error: plot_stats.py needs matplotlib (pip install matplotlib)']

def test_plot_stats_of_a_folder_without_stats(tmp_path):
    res = run_script(['plot_stats.py', f'--run={tmp_path}'], check=False)
    assert res.returncode == 1 and 'stats.jsonl not found' in res.stderr

def test_tensorboard_events_hold_the_stats_jsonl_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator # pylint: disable=import-outside-toplevel
    events = EventAccumulator(run['run_dir'])
    events.Reload()
    stats = read_jsonl(os.path.join(run['run_dir'], 'stats.jsonl'))
    for key in ['Loss/loss', 'Progress/lr', 'Timing/sec_per_kimg']:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [round(line['Progress/kimg']['mean'] * 1000) for line in stats]
        assert np.allclose([s.value for s in scalars], [line[key]['mean'] for line in stats], rtol=1e-6)

#----------------------------------------------------------------------------
# Continuing a stopped run with one command.

def test_sigint_then_the_same_command_continues_the_run_exactly(run, data, tmp_path):
    args = train_args(tmp_path, data, '--duration=0.002', '--seed=0')
    returncode, output = start_and_interrupt(args)
    assert returncode == 0, output
    (run_dir,) = run_dirs(tmp_path)
    assert f'Continue with: python train.py --resume={run_dir} --device=cpu' in output
    (state_path,) = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    stopped_ticks = len(read_jsonl(os.path.join(run_dir, 'stats.jsonl')))

    res = run_script(args) # the same command again
    assert run_dirs(tmp_path) == [run_dir]
    assert f'Continuing the interrupted run {run_dir}' in res.stdout
    assert_same_state(os.path.join(run_dir, 'training-state-000002.pt'), os.path.join(run['run_dir'], 'training-state-000002.pt'))
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['resume_state_dump'] == state_path and options['resume_kimg'] == torch.load(state_path, weights_only=False)['cur_nimg'] / 1000
    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert log.count('Training for 2 kimg') == 2 and 'Stopped at' in log # appended
    assert len(read_jsonl(os.path.join(run_dir, 'stats.jsonl'))) > stopped_ticks

    run_script(args) # a finished run's command starts a new run, as in the reference
    assert len(run_dirs(tmp_path)) == 2

def test_the_printed_command_continues_a_run_without_seed(data, tmp_path):
    returncode, output = start_and_interrupt(train_args(tmp_path, data, '--duration=0.002'), signal.SIGTERM)
    assert returncode == 0, output
    (run_dir,) = run_dirs(tmp_path)
    (command,) = [line.split('Continue with: ')[1].split('  (')[0] for line in output.splitlines() if 'Continue with: ' in line]
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        seed = json.load(f)['seed']
    assert command.startswith('python train.py --resume=')
    run_script(command.split()[1:])
    assert run_dirs(tmp_path) == [run_dir] and os.path.isfile(os.path.join(run_dir, 'training-state-000002.pt'))
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        assert json.load(f)['seed'] == seed

    res = run_script(['train.py', f'--outdir={tmp_path}', '--resume=latest', '--device=cpu']) # finished: nothing to train
    assert 'Training is already complete' in res.stdout and run_dirs(tmp_path) == [run_dir]

@pytest.mark.parametrize('extra, message', [
    (['--lr=0.5'], '--lr=0.5 conflicts with the resumed run, which has optimizer_kwargs.lr=0.001'),
    (['--batch=64'], '--batch=64 conflicts with the resumed run, which has batch_size=32'),
    (['--arch=ncsnpp'], '--arch=ncsnpp conflicts with the resumed run, which has network_kwargs.embedding_type="positional"'),
    (['--transfer=x.pkl'], '--transfer and --resume cannot be used together'),
])
def test_a_conflicting_option_is_an_error_naming_it(run, extra, message):
    before = sorted(os.listdir(run['run_dir']))
    res = run_script(['train.py', f'--resume={run["run_dir"]}', '--device=cpu', '--batch=32'] + extra, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(f'Error: {message}')
    assert sorted(os.listdir(run['run_dir'])) == before

def test_resume_needs_a_run_folder(tmp_path):
    res = run_script(['train.py', f'--resume={tmp_path}', '--device=cpu'], check=False)
    assert res.returncode == 1 and f'--resume: {tmp_path} is not a run folder' in res.stderr
    res = run_script(['train.py', f'--outdir={tmp_path}', '--resume=latest', '--device=cpu'], check=False)
    assert res.returncode == 1 and f'--resume=latest: {tmp_path} holds no training run' in res.stderr
    res = run_script(['train.py', '--device=cpu'], check=False)
    assert res.returncode == 2 and "Missing option '--outdir'" in res.stderr

#----------------------------------------------------------------------------
