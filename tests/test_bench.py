"""The speed benchmark runs (smoke test on the CPU with small configurations)."""

import json
import re

import pytest

from conftest import run_script


def test_bench_quick_runs_and_prints_figures(tmp_path):
    res = run_script(['bench/bench.py', '--quick', '--device=cpu', '--configs=tiny-ddpmpp', '--modes=bf16,fp32',
                      '--steps=2', '--timeout=300', f'--json={tmp_path / "bench.json"}'])
    lines = [line for line in res.stdout.splitlines() if line.startswith('tiny-ddpmpp')]
    assert len(lines) == 4, res.stdout
    assert re.search(r'sample fp32 +[0-9.]+ img/s  PSNR +inf dB +[0-9.]+ GFLOP/img', lines[0]), lines[0] # fp32 runs first
    assert re.search(r'sample bf16 +[0-9.]+ img/s  PSNR +[0-9.]+ dB +[0-9.]+ GFLOP/img', lines[1]), lines[1]
    assert re.search(r'train +fp32 +[0-9.]+ s/kimg', lines[2]), lines[2]
    results = json.loads((tmp_path / 'bench.json').read_text())
    assert [(r['what'], r['mode']) for r in results] == [('sample', 'fp32'), ('sample', 'bf16'), ('train', 'fp32'), ('train', 'bf16')]
    psnr = results[1]['ours']['psnr_vs_fp32']
    assert 20 < psnr < 80, psnr # bf16 changes the images, but only slightly
    assert all(r['ours']['gflop'] > 0 and r['ours']['params'] == results[0]['ours']['params'] for r in results)


@pytest.mark.parametrize('mode', [[], ['--backward']])
def test_block_fast_forms_compute_the_faithful_function(mode):
    res = run_script(['bench/bench_block.py', '--device=cpu', '--batch=2', '--eager', '--iters=1', *mode])
    lines = [line for line in res.stdout.splitlines() if 'ms per call' in line]
    assert len(lines) == 1, res.stdout
    in_float32 = float(re.search(r'in float32 ([0-9.e+-]+)', lines[0]).group(1))
    in_bf16 = float(re.search(r'error vs float32 faithful ([0-9.e+-]+)', lines[0]).group(1))
    assert in_float32 <= 1e-5 and 0 < in_bf16 < 0.05, lines[0]


def test_bench_slow_ops_are_checked():
    res = run_script(['bench/bench.py', '--quick', '--device=cpu', '--slow-ops=norm'], check=False)
    assert res.returncode != 0 and "--slow-ops: unknown operation 'norm'" in res.stderr, res.stderr
