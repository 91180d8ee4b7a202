"""train.py end to end on tiny datasets: run-directory files, snapshots that
generate.py samples from, exact resumption (after a shorter run and after
SIGTERM), a 2-process torchrun run, transfer learning, and the one-line
errors of the command line."""

import glob
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib

from conftest import ROOT, run_script, run_torchrun, subprocess_env, write_network_pkl

import train
from training import training_loop

#----------------------------------------------------------------------------
# Tiny datasets in the archive format: {i:08d}[:5]/img{i:08d}.png plus dataset.json.

def _png(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png', compress_level=0)
    return buf.getvalue()

def _images(num, res, seed):
    rnd = np.random.RandomState(seed)
    return [rnd.randint(0, 256, size=[res, res, 3], dtype=np.uint8) for _ in range(num)]

def _name(i):
    return f'{i:08d}'[:5] + f'/img{i:08d}.png'

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    uncond = root / 'tiny8.zip' # zip, no labels
    with zipfile.ZipFile(uncond, 'w', compression=zipfile.ZIP_STORED) as z:
        for i, img in enumerate(_images(16, 8, seed=0)):
            z.writestr(_name(i), _png(img))
    cond = root / 'tiny8cond' # folder with labels
    for i, img in enumerate(_images(16, 8, seed=1)):
        (cond / _name(i)).parent.mkdir(parents=True, exist_ok=True)
        (cond / _name(i)).write_bytes(_png(img))
    (cond / 'dataset.json').write_text(json.dumps({'labels': [[_name(i), i % 4] for i in range(16)]}))
    return dict(uncond=str(uncond), cond=str(cond))

# A small DDPM++ (two resolution levels) trained with batch 32: each kimg is 32 steps.
TINY = ['--cbase=16', '--cres=1,2', '--batch=32', '--tick=1', '--device=cpu']

def train_args(outdir, data_path, *extra):
    return ['train.py', f'--outdir={outdir}', f'--data={data_path}'] + TINY + list(extra)

def run_dirs(outdir):
    return sorted(glob.glob(os.path.join(str(outdir), '0*')))

def load_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)

def load_pkl(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def assert_same_tensors(a, b):
    ta = dict(list(a.named_parameters()) + list(a.named_buffers()))
    tb = dict(list(b.named_parameters()) + list(b.named_buffers()))
    assert ta.keys() == tb.keys()
    different = [name for name in ta if not torch.equal(ta[name], tb[name])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'

def assert_same_training_state(path_a, path_b):
    a, b = load_state(path_a), load_state(path_b)
    assert a['cur_nimg'] == b['cur_nimg']
    assert_same_tensors(a['net'], b['net'])
    assert_same_tensors(a['ema'], b['ema'])
    for sa, sb in zip(a['optimizer_state']['state'].values(), b['optimizer_state']['state'].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key

#----------------------------------------------------------------------------
# One uninterrupted 2-kimg run (with a data loader worker process) shared by several tests.

@pytest.fixture(scope='module')
def baseline(data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('baseline')
    res = run_script(train_args(outdir, data['uncond'], '--duration=0.002', '--seed=0', '--snap=1', '--dump=1', '--workers=1'))
    (run_dir,) = run_dirs(outdir)
    return dict(run_dir=run_dir, stdout=res.stdout)

def test_run_writes_every_file(baseline, data):
    run_dir = baseline['run_dir']
    assert os.path.basename(run_dir) == '00000-tiny8-uncond-ddpmpp-edm-cpu-batch32-fp32'
    names = sorted(os.listdir(run_dir))
    assert names == ['log.txt', 'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'network-snapshot-000002.pkl',
                     'samples-000000.png', 'samples-000001.png', 'samples-000002.png',
                     'stats.jsonl', 'training-state-000001.pt', 'training-state-000002.pt', 'training_options.json']

    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['dataset_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset', path=data['uncond'], use_labels=False,
                                             xflip=False, cache=True, resolution=8, max_size=16)
    assert options['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert options['network_kwargs']['augment_dim'] == 9 # --augment=0.12 by default
    assert options['total_kimg'] == 2 and options['batch_size'] == 32 and options['seed'] == 0

    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    ticks = [line for line in log.splitlines() if line.startswith('tick ')]
    assert [line.split()[1] for line in ticks] == ['0', '1', '2']
    for field in ['kimg', 'loss', 'lr', 'time', 'sec/tick', 'sec/kimg', 'maintenance', 'cpumem']:
        assert f' {field} ' in ticks[0]
    assert 'gpumem' not in log and 'reserved' not in log and 'GPU' not in log # a CPU run does not speak of GPUs

    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    assert len(stats) == 3
    keys = ['Loss/loss', 'Progress/tick', 'Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick', 'Timing/sec_per_kimg',
            'Timing/maintenance_sec', 'Resources/cpu_mem_gb']
    for line in stats:
        assert set(keys) <= set(line) and not any('gpu' in key for key in line) and isinstance(line['timestamp'], float)
        assert set(line['Loss/loss']) == {'num', 'mean', 'std'}
    assert [line['Progress/tick']['mean'] for line in stats] == [0, 1, 2]
    # Every pixel of every training image is reported once: 63 steps of 32 images of 3x8x8 reach 2 kimg.
    assert sum(line['Loss/loss']['num'] for line in stats) == 63 * 32 * 3 * 8 * 8

    assert not glob.glob(os.path.join(run_dir, '.*')) # no temporary files left behind

def test_snapshot_holds_ema_loss_augment_and_dataset(baseline):
    data = load_pkl(os.path.join(baseline['run_dir'], 'network-snapshot-000002.pkl'))
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    ema = data['ema']
    assert type(ema).__name__ == 'EDMPrecond' and not ema.training
    assert all(not p.requires_grad and p.device.type == 'cpu' for p in ema.parameters())
    assert type(data['loss_fn']).__name__ == 'EDMLoss'
    assert type(data['augment_pipe']).__name__ == 'AugmentPipe'
    assert data['dataset_kwargs']['resolution'] == 8
    # The snapshot's EMA is the state dump's EMA, and it denoises.
    state = load_state(os.path.join(baseline['run_dir'], 'training-state-000002.pt'))
    assert_same_tensors(ema, state['ema'])
    assert set(state) >= {'net', 'optimizer_state'}
    with torch.no_grad():
        out = ema(torch.randn([2, 3, 8, 8]), torch.tensor([1.0, 1.0]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()

def test_snapshot_samples_with_generate(baseline, tmp_path):
    run_script(['generate.py', f'--network={os.path.join(baseline["run_dir"], "network-snapshot-000002.pkl")}',
                f'--outdir={tmp_path}', '--seeds=0-1', '--steps=4', '--device=cpu'])
    images = sorted(glob.glob(os.path.join(str(tmp_path), '*.png')))
    assert len(images) == 2
    assert np.asarray(PIL.Image.open(images[0])).shape == (8, 8, 3)

#----------------------------------------------------------------------------
# Exact resumption.

def test_resume_after_shorter_run_is_bit_identical(baseline, data, tmp_path):
    run_script(train_args(tmp_path, data['uncond'], '--duration=0.001', '--seed=0', '--workers=0'))
    (first,) = run_dirs(tmp_path)
    res = run_script(train_args(tmp_path, data['uncond'], '--duration=0.002', '--workers=0', # the seed comes from the state
                                f'--resume={os.path.join(first, "training-state-000001.pt")}'))
    first, second = run_dirs(tmp_path)
    assert os.path.basename(second).startswith('00001-')
    assert 'Training for 2 kimg' in res.stdout
    with open(os.path.join(second, 'training_options.json')) as f:
        assert json.load(f)['seed'] == 0 # the resumed run records the seed it continues
    assert_same_training_state(os.path.join(second, 'training-state-000002.pt'), os.path.join(baseline['run_dir'], 'training-state-000002.pt'))
    assert_same_tensors(load_pkl(os.path.join(second, 'network-snapshot-000002.pkl'))['ema'],
                        load_pkl(os.path.join(baseline['run_dir'], 'network-snapshot-000002.pkl'))['ema'])

def test_sigterm_then_resume_is_bit_identical(baseline, data, tmp_path):
    cmd = [sys.executable] + train_args(tmp_path, data['uncond'], '--duration=0.002', '--seed=0', '--workers=1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('tick 0'):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = ''.join(lines) + rest
    assert proc.returncode == 0, output
    assert 'Stopped at' in output
    (stopped,) = run_dirs(tmp_path)
    (state_path,) = glob.glob(os.path.join(stopped, 'training-state-*.pt'))
    assert 0 < load_state(state_path)["cur_nimg"] < 2000
    assert os.path.isfile(os.path.join(stopped, f'network-snapshot-{os.path.basename(state_path)[15:-3]}.pkl')) # of the stop

    run_script(train_args(tmp_path, data['uncond'], '--duration=0.002', '--workers=1', f'--resume={state_path}'))
    _, resumed = run_dirs(tmp_path)
    assert_same_training_state(os.path.join(resumed, 'training-state-000002.pt'), os.path.join(baseline['run_dir'], 'training-state-000002.pt'))

def test_stop_on_the_step_that_ends_a_tick_then_resume(data, tmp_path):
    # Tick 1 ends on step 33 (at 1056 images); a stop requested during that step must not make the resumed run repeat the tick.
    # A stop within a kimg names its files by kimg to 3 decimals, apart from the whole-kimg ticks' files.
    def run(name, stop_at_call, *resume):
        run_dir = str(tmp_path / name)
        res = run_script(['tests/preempted_training.py', run_dir, data['uncond'], stop_at_call, *resume])
        return run_dir, [line.split()[1] for line in res.stdout.splitlines() if line.startswith('tick ')]
    whole, whole_ticks = run('whole', 0)
    stopped, stopped_ticks = run('stopped', 33)
    state = load_state(os.path.join(stopped, 'training-state-000001.056.pt'))
    assert stopped_ticks == ['0', '1'] and (state['cur_nimg'], state['cur_tick'], state['tick_start_nimg']) == (1056, 2, 1056)
    resumed, resumed_ticks = run('resumed', 0, os.path.join(stopped, 'training-state-000001.056.pt'),
                                 os.path.join(stopped, 'network-snapshot-000001.056.pkl'))
    assert whole_ticks == ['0', '1', '2'] and resumed_ticks == ['2']
    for name in ['training-state-000002.pt', 'network-snapshot-000002.pkl']:
        assert os.path.isfile(os.path.join(resumed, name)) and os.path.isfile(os.path.join(whole, name))
    assert_same_training_state(os.path.join(resumed, 'training-state-000002.pt'), os.path.join(whole, 'training-state-000002.pt'))

def test_resume_in_place_keeps_whole_stats_lines(baseline, data, tmp_path):
    # A run killed while appending to stats.jsonl leaves a partial last line; resuming into the same
    # directory (--nosubdir) drops it and appends the new ticks after the complete ones.
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    with open(os.path.join(baseline['run_dir'], 'stats.jsonl')) as f:
        old_lines = f.read().splitlines()
    (run_dir / 'stats.jsonl').write_text('\n'.join(old_lines[:2]) + '\n' + old_lines[2][:25])
    state_path = os.path.join(baseline['run_dir'], 'training-state-000001.pt')
    run_script(train_args(run_dir, data['uncond'], '--duration=0.002', '--workers=0', '--nosubdir', f'--resume={state_path}'))
    with open(run_dir / 'stats.jsonl') as f:
        lines = f.read().splitlines()
    assert lines[:2] == old_lines[:2]
    resumed = [json.loads(line) for line in lines[2:]]
    expected = json.loads(old_lines[2]) # the baseline's last tick, which the resumed run repeats
    assert [(line['Progress/kimg'], line['Loss/loss']['num']) for line in resumed] == [(expected['Progress/kimg'], expected['Loss/loss']['num'])]
    assert not glob.glob(str(run_dir / '.*'))

def test_resume_from_a_reference_layout_state(baseline, data, tmp_path):
    # The reference release's training-state files hold only `net` and `optimizer_state`;
    # progress then comes from the file name and the EMA from the matching snapshot.
    prev = tmp_path / 'prev'
    prev.mkdir()
    state = load_state(os.path.join(baseline['run_dir'], 'training-state-000001.pt'))
    torch.save(dict(net=state['net'], optimizer_state=state['optimizer_state']), prev / 'training-state-000001.pt')
    snapshot = os.path.join(baseline['run_dir'], 'network-snapshot-000001.pkl')
    (prev / 'network-snapshot-000001.pkl').write_bytes(open(snapshot, 'rb').read())
    res = run_script(train_args(tmp_path / 'out', data['uncond'], '--duration=0.002', '--workers=0', '--snap=100',
                                f'--resume={prev / "training-state-000001.pt"}'))
    ticks = [line.split() for line in res.stdout.splitlines() if line.startswith('tick ')]
    assert ticks[0][:4] == ['tick', '0', 'kimg', '1.0'] # continues at 1 kimg
    (run_dir,) = run_dirs(tmp_path / 'out')
    resumed = load_state(os.path.join(run_dir, 'training-state-000002.pt'))
    assert resumed['cur_nimg'] == 1000 + 32 * 32 # 32 steps of 32 images from 1 kimg reach 2 kimg

#----------------------------------------------------------------------------
# Multi-process training.

def test_two_processes_under_torchrun_train_one_network(data, tmp_path):
    # NCSN++ has a random buffer (Fourier frequencies): every rank must train the same network.
    res = run_torchrun(train_args(tmp_path, data['uncond'], '--arch=ncsnpp', '--duration=0.001', '--batch-gpu=8', '--seed=1',
                                  '--workers=0', '--snap=1'))
    (run_dir,) = run_dirs(tmp_path)
    assert os.path.basename(run_dir) == '00000-tiny8-uncond-ncsnpp-edm-cpu2-batch32-fp32'
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'samples-000000.png',
                                           'samples-000001.png', 'stats.jsonl', 'training-state-000001.pt', 'training_options.json']
    assert res.stdout.count('tick 1 ') == 1 # rank 0 prints
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    # Both ranks' losses are collected: 32 steps of 2 x 2 x 8 images of 3x8x8.
    assert sum(line['Loss/loss']['num'] for line in stats) == 32 * 32 * 3 * 8 * 8
    ema = load_pkl(os.path.join(run_dir, 'network-snapshot-000001.pkl'))['ema']
    state = load_state(os.path.join(run_dir, 'training-state-000001.pt'))
    assert_same_tensors(ema, state['ema'])
    assert len(state['rng_states']) == 2

#----------------------------------------------------------------------------
# Transfer learning.

def test_transfer_copies_weights_by_name(baseline, data, tmp_path):
    source_pkl = os.path.join(baseline['run_dir'], 'network-snapshot-000002.pkl')
    res = run_script(train_args(tmp_path, data['cond'], '--cond=1', '--duration=0.001', '--workers=0', f'--transfer={source_pkl}'))
    assert 'model.map_label.weight' in res.stdout # the unconditional source lacks the label embedding
    (run_dir,) = run_dirs(tmp_path)
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['resume_pkl'] == source_pkl and options['ema_rampup_ratio'] is None
    # The first step has learning rate 0, so the first snapshot's EMA is the source network.
    source = dict(load_pkl(source_pkl)['ema'].named_parameters())
    target = dict(load_pkl(os.path.join(run_dir, 'network-snapshot-000000.pkl'))['ema'].named_parameters())
    assert 'model.map_label.weight' in target and 'model.map_label.weight' not in source
    for name, tensor in source.items():
        assert torch.equal(target[name], tensor), name

def test_transfer_from_unrelated_network_is_a_clear_error(data, tmp_path):
    pkl = write_network_pkl(tmp_path / 'unrelated.pkl', torch.nn.Linear(2, 2))
    res = run_script(train_args(tmp_path / 'out', data['uncond'], '--workers=0', f'--transfer={pkl}'), check=False)
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith('Error: ') and 'unrelated.pkl' in res.stderr

#----------------------------------------------------------------------------
# The command line without training: dry run, config, errors.

def invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])

def test_dry_run_prints_options_and_creates_nothing(data, tmp_path):
    outdir = tmp_path / 'runs'
    res = invoke(['--outdir', outdir, '--data', data['uncond'], '--device=cpu', '--workers=0', '-n'])
    assert res.exit_code == 0, res.output
    assert 'Training options:' in res.output and 'Dry run; exiting.' in res.output
    text = res.output
    options = json.loads(text[text.index('{'):text.index('\n}\n') + 2])
    assert options['network_kwargs']['model_channels'] == 128 and options['network_kwargs']['channel_mult'] == [2, 2, 2]
    assert options['total_kimg'] == 200000 and options['ema_halflife_kimg'] == 500
    assert not outdir.exists()
    seed = options['seed']
    again = invoke(['--outdir', outdir, '--data', data['uncond'], '--device=cpu', '--workers=0', '-n']).output
    assert json.loads(again[again.index('{'):again.index('\n}\n') + 2])['seed'] != seed # random by default

@pytest.mark.parametrize('arch, precond, expected', [
    ('ddpmpp', 'vp',  dict(class_name='training.networks.VPPrecond', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                           channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])),
    ('ncsnpp', 've',  dict(class_name='training.networks.VEPrecond', model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                           channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])),
    ('adm',    'edm', dict(class_name='training.networks.EDMPrecond', model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])),
])
def test_build_config_follows_the_presets(arch, precond, expected):
    opts = train.default_options(outdir='runs', data='x.zip', arch=arch, precond=precond, duration=0.5, batch=64, lr=2e-4, ema=0.05,
                                 dropout=0.1, augment=0, fp16=True, ls=100, workers=2, desc='note', seed=3)
    dataset = dict(name='x', resolution=32, num_channels=3, size=100, has_labels=False)
    c, desc = train.build_config(opts, dnnlib.EasyDict(dataset), world_size=2)
    for key, value in expected.items():
        assert c.network_kwargs[key] == value, key
    assert c.network_kwargs.use_fp16 is True and c.network_kwargs.dropout == 0.1 and 'augment_dim' not in c.network_kwargs
    assert c.loss_kwargs.class_name == f'training.loss.{precond.upper()}Loss'
    assert 'augment_kwargs' not in c
    assert c.total_kimg == 500 and c.ema_halflife_kimg == 50 and c.loss_scaling == 100
    assert c.optimizer_kwargs == dict(class_name='torch.optim.Adam', lr=2e-4, betas=[0.9, 0.999], eps=1e-8)
    assert c.data_loader_kwargs == dict(pin_memory=True, num_workers=2, prefetch_factor=2)
    assert desc == f'x-uncond-{arch}-{precond}-gpus2-batch64-fp16-note'

@pytest.fixture
def resume_file(tmp_path):
    path = tmp_path / 'prev' / 'training-state-000003.pt'
    path.parent.mkdir()
    path.write_bytes(b'')
    return str(path)

@pytest.mark.parametrize('case', ['cond-unlabelled', 'batch-gpu', 'resume-name', 'resume-missing', 'transfer-resume',
                                  'resolution', 'missing-data', 'bad-data'])
def test_clear_one_line_errors(case, data, tmp_path, resume_file):
    outdir = tmp_path / 'runs'
    args = {
        'cond-unlabelled':  ['--data', data['uncond'], '--cond=1'],
        'batch-gpu':        ['--data', data['uncond'], '--batch=30', '--batch-gpu=8'],
        'resume-name':      ['--data', data['uncond'], f'--resume={tmp_path / "state.pt"}'],
        'resume-missing':   ['--data', data['uncond'], f'--resume={tmp_path / "training-state-000001.pt"}'],
        'transfer-resume':  ['--data', data['uncond'], f'--resume={resume_file}', '--transfer=net.pkl'],
        'resolution':       ['--data', data['uncond'], '--cres=1,2,2,2,2'], # 8x8 cannot be halved 4 times
        'missing-data':     [],
        'bad-data':         ['--data', tmp_path / 'nothing.zip'],
    }[case]
    expected = {
        'cond-unlabelled': '--cond', 'batch-gpu': '--batch-gpu', 'resume-name': 'training-state-NNNNNN.pt',
        'resume-missing': 'does not exist', 'transfer-resume': '--transfer and --resume', 'resolution': 'divisible by 16',
        'missing-data': "'--data'", 'bad-data': 'nothing.zip',
    }[case]
    res = invoke(['--outdir', outdir, '--device=cpu', '--workers=0', '-n'] + args)
    assert res.exit_code != 0
    assert 'Traceback' not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and expected in errors[0], res.output
    assert not outdir.exists()

@pytest.mark.parametrize('case', ['state-without-ema-or-snapshot', 'transfer-shape-mismatch', 'outdir-is-a-file', 'unknown-device'])
def test_clear_one_line_errors_of_real_runs(case, baseline, data, tmp_path):
    state = load_state(os.path.join(baseline['run_dir'], 'training-state-000001.pt'))
    reference_layout = tmp_path / 'prev' / 'training-state-000001.pt' # no network snapshot beside it
    reference_layout.parent.mkdir()
    torch.save(dict(net=state['net'], optimizer_state=state['optimizer_state']), reference_layout)
    snapshot = os.path.join(baseline['run_dir'], 'network-snapshot-000001.pkl')
    (tmp_path / 'afile').write_text('')
    outdir, extra, expected = {
        'state-without-ema-or-snapshot': ('runs', [f'--resume={reference_layout}', '--duration=0.002'], f'{reference_layout} holds no EMA'),
        'transfer-shape-mismatch':       ('runs', [f'--transfer={snapshot}', '--cbase=8'], f'{snapshot}: shape mismatch'),
        'outdir-is-a-file':              ('afile', [], '(--outdir)'),
        'unknown-device':                ('runs', ['--device=bogus'], '--device=bogus is not a device name'),
    }[case]
    res = run_script(train_args(tmp_path / outdir, data['uncond'], '--duration=0.001', '--workers=0', *extra), check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith('Error: ') and expected in res.stderr.strip().splitlines()[-1], res.stderr

def test_resume_on_a_changed_dataset_starts_a_new_data_order(baseline, data, tmp_path):
    # --xflip=1 doubles the dataset: the saved data order no longer fits it, so a fresh one starts, as the reference's would.
    res = run_script(train_args(tmp_path, data['uncond'], '--duration=0.002', '--workers=0', '--xflip=1',
                                f'--resume={os.path.join(baseline["run_dir"], "training-state-000001.pt")}'))
    assert "the state's data order is for 16 images, the dataset has 32; the data order starts afresh" in res.stdout
    (run_dir,) = run_dirs(tmp_path)
    assert load_state(os.path.join(run_dir, 'training-state-000002.pt'))['cur_nimg'] == 2016

def test_fp16_run_without_overflow_equals_the_fixed_scale(data, tmp_path):
    # On the CPU the networks compute in float32 even with --fp16=1, so nothing overflows: the dynamic loss scale
    # never moves and the run is bit-identical to the reference's fixed scale (here with --fp16=0).
    states = {}
    for fp16 in ['0', '1']:
        run_script(train_args(tmp_path / fp16, data['uncond'], '--duration=0.001', '--workers=0', '--seed=0', '--ls=100',
                              f'--fp16={fp16}', '--dump=1'))
        (run_dir,) = run_dirs(tmp_path / fp16)
        states[fp16] = load_state(os.path.join(run_dir, 'training-state-000001.pt'))
    assert states['1']['loss_scale'] == dict(scale=100.0, clean_steps=32) and states['0']['loss_scale'] is None
    for name, tensor in states['0']['net'].state_dict().items():
        assert torch.equal(tensor, states['1']['net'].state_dict()[name]), name

@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_fp16_overflowing_steps_are_skipped_and_the_scale_halves(data, tmp_path, precision):
    # --ls=1e37 overflows float32 in the backward pass of the first steps (on the CPU --fp16=1 computes in float32).
    # Those steps are skipped and the scale halves until the gradients, rescaled to 1e37 for Adam, are finite.
    # bf16 steps with fused Adam, which skips on the device, where PyTorch has it for the CPU (2.4 and newer).
    run_script(train_args(tmp_path, data['uncond'], '--duration=0.001', '--workers=0', '--seed=0', '--ls=1e37',
                          '--fp16=1', '--dump=1', f'--precision={precision}'))
    (run_dir,) = run_dirs(tmp_path)
    state = load_state(os.path.join(run_dir, 'training-state-000001.pt'))
    fused = state['optimizer_state']['param_groups'][0].get('fused')
    assert bool(fused) == (precision == 'bf16' and training_loop.fused_adam_kwargs(dict(class_name='torch.optim.Adam'), 'cpu') != {})
    skipped = [json.loads(line)['Loss/skipped_step'] for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    num_skipped = round(sum(s['num'] * s['mean'] for s in skipped))
    assert skipped[0]['mean'] == 1 and 1 < num_skipped < 16
    assert float(state['optimizer_state']['state'][0]['step']) == 32 - num_skipped
    assert 1e35 < state['loss_scale']['scale'] < 1e37
    assert all(torch.isfinite(p).all() for p in state['net'].parameters())
    scales = [json.loads(line)['Loss/scale']['mean'] for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert scales[-1] == state['loss_scale']['scale'] and scales[0] == float(np.float32(1e37)) / 2 # one halving by the first tick; the scale is float32

def test_fp16_warns_once_when_every_step_is_skipped(data, tmp_path):
    # At --ls=1e38 the gradients rescaled for Adam overflow float32 at any backward scale: all 32 steps are skipped,
    # the scale halves 32 times, and the user is told once, at the first tick past 2^24 halvings.
    res = run_script(train_args(tmp_path, data['uncond'], '--duration=0.001', '--workers=0', '--seed=0', '--ls=1e38',
                                '--fp16=1', '--dump=1', '--precision=fp32'))
    (run_dir,) = run_dirs(tmp_path)
    state = load_state(os.path.join(run_dir, 'training-state-000001.pt'))
    assert state['loss_scale']['scale'] == float(np.float32(1e38)) * 2**-32
    assert 'step' not in state['optimizer_state']['state'].get(0, {})
    warnings = [line for line in res.stdout.splitlines() if line.startswith('Warning: the float16 loss scale')]
    assert len(warnings) == 1 and '--ls=1e+38' in warnings[0] and 'every step is skipped' in warnings[0]

def test_batch_must_split_over_gpus():
    train.check_batch(32, 8, 2)
    with pytest.raises(ValueError, match='number of GPUs'):
        train.check_batch(31, None, 2)
    with pytest.raises(ValueError, match='2 GPUs x --batch-gpu=3'):
        train.check_batch(32, 3, 2)

def test_error_from_the_real_command_line(data, tmp_path):
    res = run_script(['train.py', f'--outdir={tmp_path / "runs"}', f'--data={data["uncond"]}', '--cond=1', '--device=cpu'], check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines() == ['Error: --cond=True requires class labels in dataset.json, but ' + data['uncond'] + ' has none']

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Speed options: the bf16 fast path follows the faithful float32 run closely
# and still writes faithful snapshots.

def test_bf16_fast_path_tracks_fp32(data, tmp_path):
    losses = {}
    runs = {'fp32': ['--precision=fp32'], 'bf16': ['--precision=bf16'], 'compiled': ['--precision=bf16', '--compile=1']}
    for name, options in runs.items():
        outdir = tmp_path / name
        run_script(train_args(outdir, data['uncond'], '--duration=0.001', '--seed=0', '--workers=0', *options))
        (run_dir,) = run_dirs(outdir)
        with open(os.path.join(run_dir, 'stats.jsonl')) as f:
            losses[name] = [json.loads(line)['Loss/loss']['mean'] for line in f]
        recorded = json.loads(open(os.path.join(run_dir, 'training_options.json')).read())
        assert recorded.get('precision', 'fp32') == options[0].split('=')[1]
        assert bool(recorded.get('compile', False)) == (name == 'compiled')
    # Same data, noise levels and noise: the per-tick mean loss differs only by bf16 rounding.
    np.testing.assert_allclose(losses['bf16'], losses['fp32'], rtol=0.03)
    np.testing.assert_allclose(losses['compiled'], losses['fp32'], rtol=0.03)
    for name in ['bf16', 'compiled']:
        snapshot = load_pkl(sorted(glob.glob(os.path.join(run_dirs(tmp_path / name)[0], 'network-snapshot-*.pkl')))[-1])
        blocks = [m for m in snapshot['ema'].modules() if type(m).__name__ == 'UNetBlock']
        assert blocks and not any(m.fast_paths for m in snapshot['ema'].modules() if hasattr(m, 'fast_paths'))
        assert all(p.is_contiguous() for p in snapshot['ema'].parameters())
