"""train.py's ways out: resuming a finished run, errors with data loader
workers and under torchrun (never a hang), run folders that never collide,
and a full disk named in one line."""

import glob
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT, free_port, run_script, subprocess_env

import train

#----------------------------------------------------------------------------
# Tiny datasets and runs: 8x8 images, one resolution level of 8 channels, batch 8 (125 steps per kimg).

def _png(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png', compress_level=0)
    return buf.getvalue()

def _write_zip(path, num=16, broken=None):
    """A dataset zip of `num` random 8x8 RGB images; `broken` maps an index to the bytes stored instead."""
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(num):
            data = _png(rnd.randint(0, 256, size=[8, 8, 3], dtype=np.uint8))
            z.writestr(f'00000/img{i:08d}.png', (broken or {}).get(i, data))
    return str(path)

CORRUPT = b'\x89PNG\r\n\x1a\n' + b'not an image' * 4
MIXED = _png(np.zeros([16, 16, 3], dtype=np.uint8))

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return dict(good=_write_zip(root / 'good.zip'), corrupt=_write_zip(root / 'corrupt.zip', broken={5: CORRUPT}),
                bad=_write_zip(root / 'bad.zip', broken={5: CORRUPT, 11: MIXED}))

TINY = ['--cbase=8', '--cres=1', '--batch=8', '--tick=1', '--augment=0', '--device=cpu', '--seed=0']

def train_args(outdir, data_path, *extra):
    return ['train.py', f'--outdir={outdir}', f'--data={data_path}'] + TINY + list(extra)

def run_dirs(outdir):
    return sorted(glob.glob(os.path.join(str(outdir), '0*')))

def load_pkl(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def assert_same_weights(a, b):
    ta, tb = a.state_dict(), b.state_dict()
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[name], tb[name]) for name in ta)

def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith('Error: ')]

#----------------------------------------------------------------------------
# A. Resuming a finished run trains nothing.

@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('finished')
    run_script(train_args(outdir, data['good'], '--duration=0.001', '--snap=1', '--dump=1', '--workers=0'))
    (run_dir,) = run_dirs(outdir)
    return run_dir

@pytest.mark.parametrize('killed_after', ['snapshot', 'state-dump'])
def test_resume_of_a_finished_run_trains_nothing(finished, data, tmp_path, killed_after):
    run_dir = shutil.copytree(finished, tmp_path / 'run')
    snapshot = os.path.join(run_dir, 'network-snapshot-000001.pkl')
    with open(snapshot, 'rb') as f:
        original = f.read()
    if killed_after == 'state-dump': # the run ended between its last state dump and its last snapshot
        os.remove(snapshot)
    res = run_script(train_args(tmp_path / 'runs', data['good'], '--duration=0.001', '--snap=1', '--dump=1', '--workers=0',
                                f'--resume={os.path.join(run_dir, "training-state-000001.pt")}'))
    complete = [line for line in res.stdout.splitlines() if 'already complete' in line]
    assert len(complete) == 1 and 'tick ' not in res.stdout, res.stdout
    assert not os.path.exists(tmp_path / 'runs') # no new run folder
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(finished))
    if killed_after == 'snapshot':
        with open(snapshot, 'rb') as f:
            assert f.read() == original # untouched
    else:
        assert_same_weights(load_pkl(snapshot)['ema'], pickle.loads(original)['ema'])

#----------------------------------------------------------------------------
# B. Errors end the run, with any number of data loader workers and under torchrun.

@pytest.mark.parametrize('workers', [0, 1, 4])
def test_bad_image_ends_the_run_with_one_line(data, tmp_path, workers):
    # Without the fix this waited forever. The bound is loose: starting 4 workers takes ~20 s on 2 busy cores.
    res = run_script(train_args(tmp_path, data['bad'], '--duration=0.001', f'--workers={workers}'), check=False, timeout=90)
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr, res.stderr
    (error,) = error_lines(res.stderr)
    assert 'img00000005.png' in error or 'img00000011.png' in error, error

def _torchrun(args, env):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={free_port()}'] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

def _finish(proc, timeout):
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return output

def test_torchrun_rank_with_a_bad_image_ends_the_run(data, tmp_path):
    # The images are dealt between the ranks: one of them reads the corrupt one while the other waits for its gradients.
    start = time.time()
    proc = _torchrun(train_args(tmp_path, data['corrupt'], '--duration=0.001', '--workers=1'), subprocess_env(EDM_COLLECTIVE_TIMEOUT=20))
    output = _finish(proc, timeout=120)
    assert proc.returncode != 0 and time.time() - start < 90, output
    errors = error_lines(output)
    assert any(line.startswith('Error: rank ') and 'img00000005.png' in line for line in errors), output

def test_torchrun_rank_killed_ends_the_run(data, tmp_path):
    import psutil # pylint: disable=import-outside-toplevel
    proc = _torchrun(train_args(tmp_path, data['good'], '--duration=1', '--workers=0'), subprocess_env(EDM_COLLECTIVE_TIMEOUT=20))
    try:
        for line in proc.stdout:
            if line.startswith('tick 0'):
                break
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get('RANK') == '1']
        ranks[0].send_signal(signal.SIGKILL)
        start = time.time()
        output = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - start < 90, output
    assert any('rank 0' in line for line in error_lines(output)), output

def test_collective_timeout_is_read_from_the_environment(monkeypatch):
    from torch_utils import distributed as dist # pylint: disable=import-outside-toplevel
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.collective_timeout() == dist.DEFAULT_TIMEOUT
    monkeypatch.setenv(dist.TIMEOUT_ENV, '12.5')
    assert dist.collective_timeout() == 12.5
    monkeypatch.setenv(dist.TIMEOUT_ENV, 'soon')
    with pytest.raises(ValueError, match='EDM_COLLECTIVE_TIMEOUT=soon'):
        dist.collective_timeout()

#----------------------------------------------------------------------------
# C. Run folders never collide, and nothing is created for a refused command.

def _create(outdir, queue):
    queue.put(train.create_run_dir(outdir, 'desc'))

def test_runs_started_together_get_different_folders(tmp_path):
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(tmp_path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    created = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(os.path.basename(d) for d in created) == [f'{i:05d}-desc' for i in range(6)]

def invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args])

@pytest.mark.parametrize('case', ['desc-separator', 'desc-dotdot', 'transfer-missing', 'resume-missing', 'nosubdir-other-run'])
def test_refused_commands_create_no_folder(case, finished, data, tmp_path):
    outdir = tmp_path / 'runs'
    extra, expected = {
        'desc-separator':     (['--desc=../escape'], '--desc'),
        'desc-dotdot':        (['--desc=..'], '--desc'),
        'transfer-missing':   ([f'--transfer={tmp_path / "nothing.pkl"}'], 'nothing.pkl does not exist'),
        'resume-missing':     ([f'--resume={tmp_path / "training-state-000001.pt"}'], 'does not exist'),
        'nosubdir-other-run': (['--nosubdir'], 'already holds a training run'),
    }[case]
    if case == 'nosubdir-other-run':
        outdir = shutil.copytree(finished, tmp_path / 'other')
        before = sorted(os.listdir(outdir))
    res = invoke(['--outdir', outdir, '--data', data['good'], '--duration=0.001', '--device=cpu', '--workers=0'] + extra)
    assert res.exit_code != 0 and 'Traceback' not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and expected in errors[0], res.output
    if case == 'nosubdir-other-run':
        assert sorted(os.listdir(outdir)) == before
    else:
        assert not os.path.exists(outdir)
    assert not glob.glob(str(tmp_path / '*escape*'))

@pytest.mark.parametrize('case', ['truncated', 'empty', 'network-pickle'])
def test_failed_resume_leaves_no_run_folder(case, finished, data, tmp_path):
    with open(os.path.join(finished, 'training-state-000001.pt'), 'rb') as f:
        state = f.read()
    with open(os.path.join(finished, 'network-snapshot-000001.pkl'), 'rb') as f:
        snapshot = f.read()
    resume = tmp_path / 'training-state-000000.pt' # kimg 0: the run would train
    resume.write_bytes({'truncated': state[:len(state) // 2], 'empty': b'', 'network-pickle': snapshot}[case])
    outdir = tmp_path / 'runs'
    res = run_script(train_args(outdir, data['good'], '--duration=0.002', '--workers=0', f'--resume={resume}'), check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr
    assert len(error_lines(res.stderr)) == 1 and str(resume) in error_lines(res.stderr)[0], res.stderr
    assert not os.listdir(outdir)

#----------------------------------------------------------------------------
# D. A full disk: one line naming the file, no temporary left behind.

@pytest.fixture
def small_disk(tmp_path):
    """A 640 KiB tmpfs (real ENOSPC); skipped where mounting is not permitted."""
    mount_point = tmp_path / 'disk'
    mount_point.mkdir()
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=640k', 'tmpfs', str(mount_point)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs to fill (needs root): {res.stderr.strip()}')
    yield mount_point
    subprocess.run(['umount', str(mount_point)], check=False)

def _fill(folder, leave_bytes):
    stat = os.statvfs(folder)
    with open(os.path.join(folder, 'filler'), 'wb') as f:
        f.write(b'\0' * max(stat.f_bavail * stat.f_frsize - leave_bytes, 0))

@pytest.mark.parametrize('victim', ['log.txt', 'network-snapshot-000000.pkl', 'training-state-000001.pt'])
def test_full_disk_names_the_file(small_disk, data, victim):
    # The snapshot is ~210 kB and the state ~660 kB: two snapshots fit on the 640 KiB disk, the state does not.
    if victim != 'training-state-000001.pt':
        _fill(small_disk, leave_bytes={'log.txt': 4096, 'network-snapshot-000000.pkl': 64 << 10}[victim])
    res = run_script(train_args(small_disk / 'runs', data['good'], '--duration=0.001', '--workers=1', '--dump=1'), check=False, timeout=60)
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr
    (run_dir,) = run_dirs(small_disk / 'runs')
    assert res.stderr.strip().splitlines()[-1] == f'Error: No space left on device: {os.path.join(run_dir, victim)}', res.stderr
    assert not glob.glob(os.path.join(run_dir, '.*tmp*')) # the temporary is removed

#----------------------------------------------------------------------------
# Progress: the tick line's loss and learning rate, fractional ticks, CPU threads, the run name.

def test_fractional_ticks_show_loss_and_learning_rate(data, tmp_path):
    res = run_script(train_args(tmp_path, data['good'], '--duration=0.001', '--tick=0.5', '--lr-rampup=1', '--workers=0'))
    ticks = [line.split() for line in res.stdout.splitlines() if line.startswith('tick ')]
    assert [t[3] for t in ticks] == ['0.008', '0.512', '1.000'] # after 1, 64 and 125 steps of 8 images
    with open(os.path.join(run_dirs(tmp_path)[0], 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    for fields, line in zip(ticks, stats):
        assert fields[4] == 'loss' and float(fields[5]) == pytest.approx(line['Loss/loss']['mean'], rel=1e-3) # one process: the same mean
        assert fields[6] == 'lr' and float(fields[7]) == pytest.approx(line['Progress/lr']['mean'], rel=1e-2)
    # The learning rate ramps up over --lr-rampup=1 kimg: it is read at the last step of each tick.
    assert [float(t[7]) for t in ticks] == pytest.approx([0, 1e-3 * 504 / 1000, 1e-3 * 992 / 1000], rel=1e-2)
    assert os.path.basename(run_dirs(tmp_path)[0]).endswith('-cpu-batch8-fp32')

def test_cpu_threads_use_every_physical_core_unless_the_user_chose(monkeypatch):
    from torch_utils import misc # pylint: disable=import-outside-toplevel
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert misc.cpu_threads() is None # the user's choice stands
    monkeypatch.delenv('OMP_NUM_THREADS')
    usable = len(os.sched_getaffinity(0))
    cores = min(usable, misc.psutil.cpu_count(logical=False) or usable)
    assert misc.cpu_threads() == cores # however busy the machine is
    assert misc.cpu_threads(num_processes=2) == max(1, cores // 2) # torchrun's local processes share them
    assert misc.cpu_threads(num_processes=4 * cores) == 1

#----------------------------------------------------------------------------
# A console that goes away (`train.py | tee log`, then Ctrl-C stops tee too) loses nothing.

@pytest.mark.parametrize('way_out', ['sigint', 'end'])
def test_a_closed_console_stops_no_save_and_log_txt_keeps_everything(data, tmp_path, way_out):
    duration = {'sigint': '--duration=1', 'end': '--duration=0.001'}[way_out] # 1 kimg: 125 steps
    args = train_args(tmp_path / 'runs', data['good'], duration, '--snap=1000', '--dump=1000', '--workers=0')
    with open(tmp_path / 'stderr.txt', 'w') as stderr:
        proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in proc.stdout:
            if line.startswith('tick 0 '):
                break
        proc.stdout.close() # the reader quits: every later write to stdout is a broken pipe
        if way_out == 'sigint':
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / 'stderr.txt').read_text()
    (run_dir,) = run_dirs(tmp_path / 'runs')
    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    ticks = [line for line in log.splitlines() if line.startswith('tick ')]
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(ticks) == len(stats) == 2 and 'Exiting...' in log
    cur_nimg = round(stats[-1]['Progress/kimg']['mean'] * 1000)
    label = f'{cur_nimg // 1000:06d}' + ('' if cur_nimg % 1000 == 0 else f'.{cur_nimg % 1000:03d}') # a stop within a kimg: exact
    names = os.listdir(run_dir)
    assert sorted(name for name in names if name.startswith(('training-state-', 'network-snapshot-'))) == \
        sorted(['network-snapshot-000000.pkl', f'network-snapshot-{label}.pkl', f'training-state-{label}.pt']) # tick 0; the stop or the end
    if way_out == 'sigint':
        assert f'Stopped at {cur_nimg} images' in log and 0 < cur_nimg < 1000
    else:
        assert cur_nimg == 1000

#----------------------------------------------------------------------------
# Fractional ticks: every snapshot, grid and state keeps its own name; a resume continues ticks and time.

def test_fractional_ticks_keep_every_file_and_resume_continues_ticks_and_time(data, tmp_path):
    # --tick=0.25 with batch 8: ticks at 8, 264, 520, 776 and 1000 images; whole-kimg names would give 000000 four times.
    run_script(train_args(tmp_path, data['good'], '--duration=0.001', '--tick=0.25', '--snap=1', '--dump=1', '--workers=0'))
    (run_dir,) = run_dirs(tmp_path)
    nimgs = [round(line['Progress/kimg']['mean'] * 1000) for line in map(json.loads, open(os.path.join(run_dir, 'stats.jsonl')))]
    assert nimgs == [8, 264, 520, 776, 1000]
    labels = [f'{nimg // 1000:06d}.{nimg % 1000:03d}' for nimg in nimgs]
    names = set(os.listdir(run_dir))
    assert {f'network-snapshot-{label}.pkl' for label in labels} <= names
    assert {f'samples-{label}.png' for label in labels} <= names
    assert {f'training-state-{label}.pt' for label in labels[1:]} <= names # no state at tick 0
    assert torch.load(os.path.join(run_dir, 'training-state-000000.520.pt'), weights_only=False)['cur_nimg'] == 520
    # The same run continued to 2 kimg: from the newest state (1000 images), ticks 5-8, the time goes on.
    res = run_script(['train.py', f'--resume={run_dir}', '--duration=0.002'])
    assert 'from ' + os.path.join(run_dir, 'training-state-000001.000.pt') in res.stdout
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert [line['Progress/tick']['mean'] for line in stats] == list(range(9))
    total_sec = [line['Timing/total_sec']['mean'] for line in stats]
    assert total_sec == sorted(total_sec) and total_sec[5] >= total_sec[4] + stats[5]['Timing/sec_per_tick']['mean']
    assert 'network-snapshot-000002.000.pkl' in os.listdir(run_dir)
