"""training_stats: statistics summed over processes equal the single-process values."""

import json
import textwrap

import numpy as np

from conftest import run_script, run_torchrun

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from torch_utils import distributed as dist, training_stats
    dist.init('cpu')
    rank, world = dist.get_rank(), dist.get_world_size()
    collector = training_stats.Collector(regex='.*') # sees what is reported after its creation
    values = torch.arange(12, dtype=torch.float32) ** 1.5
    for i in range(rank, 12, world): # each rank reports its share
        training_stats.report('Loss/loss', values[i])
    training_stats.report('Misc/batch', values[rank::world].tolist())
    training_stats.report0('Progress/tick', 7)
    collector.update()
    if rank == 0:
        with open(sys.argv[1], 'w') as f:
            json.dump(collector.as_dict(), f)
''')


def test_stats_across_two_processes_equal_single_process(tmp_path):
    script = tmp_path / 'stats_script.py'
    script.write_text(SCRIPT)
    run_script([script, tmp_path / 'single.json'])
    run_torchrun([script, tmp_path / 'multi.json'], nproc=2)
    single = json.loads((tmp_path / 'single.json').read_text())
    multi = json.loads((tmp_path / 'multi.json').read_text())
    values = np.arange(12) ** 1.5
    assert single['Loss/loss']['num'] == 12
    np.testing.assert_allclose(single['Loss/loss']['mean'], values.mean(), rtol=1e-6)
    np.testing.assert_allclose(single['Loss/loss']['std'], values.std(), rtol=1e-5)
    assert multi['Progress/tick'] == {'num': 1, 'mean': 7.0, 'std': 0.0}
    for name in ['Loss/loss', 'Misc/batch']:
        assert multi[name]['num'] == single[name]['num'] == 12
        np.testing.assert_allclose(multi[name]['mean'], single[name]['mean'], rtol=1e-6)
        np.testing.assert_allclose(multi[name]['std'], single[name]['std'], rtol=1e-6)
