"""The speed benchmark runs (smoke test on the CPU with small configurations)."""

import re

from conftest import run_script


def test_bench_quick_runs_and_prints_figures():
    res = run_script(['bench/bench.py', '--quick', '--device=cpu', '--configs=tiny-ddpmpp', '--modes=fp32',
                      '--steps=2', '--timeout=300'])
    lines = [line for line in res.stdout.splitlines() if line.startswith('tiny-ddpmpp')]
    assert len(lines) == 2, res.stdout
    assert re.search(r'sample fp32 +[0-9.]+ img/s +[0-9.]+ GFLOP/img', lines[0]), lines[0]
    assert re.search(r'train +fp32 +[0-9.]+ s/kimg', lines[1]), lines[1]
