"""Persistence format v6: reference pickles load here, ours load without their source."""

import os
import pickle
import textwrap

import numpy as np
import torch

from conftest import fixture_file, run_script


def _check_fixture_objects(data, expected):
    net, schedule = data['net'], data['schedule']
    with torch.no_grad():
        out = net(torch.as_tensor(expected['x'])).numpy()
    np.testing.assert_allclose(out, expected['out'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(schedule(7), expected['schedule_7'], rtol=1e-12)
    assert dict(net.init_kwargs) == {'depth': 2, 'label': 'fixture'}
    assert net.init_args == (5, 6)
    assert data['info'].name == 'fixture' # dnnlib.EasyDict attribute access


def test_reference_pickle_loads_and_repickles():
    import dnnlib
    from torch_utils import persistence
    expected = np.load(fixture_file('persistence-v6-expected.npz'))
    with open(fixture_file('persistence-v6.pkl'), 'rb') as f:
        data = pickle.load(f)
    assert isinstance(data['info'], dnnlib.EasyDict)
    assert persistence.is_persistent(data['net']) and persistence.is_persistent(data['schedule'])
    _check_fixture_objects(data, expected)

    # Round trip through our persistence: the embedded source travels along.
    again = pickle.loads(pickle.dumps(data))
    _check_fixture_objects(again, expected)
    assert type(again['net']).__name__ == 'TinyNet'


def test_reference_pickle_loads_in_fresh_process(tmp_path):
    script = textwrap.dedent(f'''
        import pickle, sys, numpy as np, torch
        assert 'training' not in sys.modules
        with open({fixture_file('persistence-v6.pkl')!r}, 'rb') as f:
            data = pickle.load(f)
        e = np.load({fixture_file('persistence-v6-expected.npz')!r})
        out = data['net'](torch.as_tensor(e['x'])).detach().numpy()
        print(float(np.abs(out - e['out']).max()), data['net'].init_kwargs['label'])
    ''')
    res = run_script(['-c', script], cwd=str(tmp_path))
    err, label = res.stdout.split()
    assert float(err) < 1e-6 and label == 'fixture'


def test_pickle_survives_deleted_module(tmp_path):
    module_dir = tmp_path / 'mods'
    module_dir.mkdir()
    (module_dir / 'scratch_module.py').write_text(textwrap.dedent('''
        import torch
        from torch_utils import persistence

        @persistence.persistent_class
        class Scaler(torch.nn.Module):
            def __init__(self, gain, bias=0.0):
                super().__init__()
                self.gain = gain
                self.weight = torch.nn.Parameter(torch.full([3], float(bias)))

            def forward(self, x):
                return x * self.gain + self.weight
    '''))
    pkl = tmp_path / 'scaler.pkl'
    writer = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {str(module_dir)!r})
        import scratch_module
        obj = scratch_module.Scaler(2.5, bias=0.25)
        with torch.no_grad():
            obj.weight.add_(torch.tensor([0.0, 1.0, 2.0]))
        with open({str(pkl)!r}, 'wb') as f:
            pickle.dump(obj, f)
    ''')
    run_script(['-c', writer], cwd=str(tmp_path))
    os.remove(module_dir / 'scratch_module.py')
    reader = textwrap.dedent(f'''
        import pickle, torch
        with open({str(pkl)!r}, 'rb') as f:
            obj = pickle.load(f)
        print(obj(torch.ones(3)).tolist(), obj.init_args, dict(obj.init_kwargs))
    ''')
    res = run_script(['-c', reader], cwd=str(tmp_path))
    assert res.stdout.strip() == '[2.75, 3.75, 4.75] (2.5,) {\'bias\': 0.25}'


def test_unpicklable_state_fails_at_construction(tmp_path):
    module_dir = tmp_path / 'mods2'
    module_dir.mkdir()
    (module_dir / 'bad_module.py').write_text(textwrap.dedent('''
        from torch_utils import persistence

        @persistence.persistent_class
        class HoldsLambda:
            def __init__(self):
                self.fn = lambda x: x
    '''))
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(module_dir)!r})
        import bad_module
        try:
            bad_module.HoldsLambda()
        except Exception as err:
            print('failed early:', type(err).__name__)
    ''')
    res = run_script(['-c', script], cwd=str(tmp_path))
    assert 'failed early' in res.stdout


def test_import_hook_can_patch_source(tmp_path):
    from torch_utils import persistence
    with open(fixture_file('persistence-v6.pkl'), 'rb') as f:
        raw = f.read()
    seen = []
    def hook(meta):
        seen.append(meta.class_name)
        return meta
    persistence.import_hook(hook)
    try:
        pickle.loads(raw)
    finally:
        persistence._import_hooks.remove(hook)
    assert 'TinyNet' in seen and 'TinySchedule' in seen
