"""Loading network pickles: clear errors, and rebuilding with our own classes."""

import pickle
import textwrap

import pytest
import torch

from conftest import make_tiny_net, run_script, write_network_pkl
from training.network_io import load_network_pkl, rebuild_network


def test_bad_network_files_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match='not found'):
        load_network_pkl(str(tmp_path / 'absent.pkl'))
    (tmp_path / 'junk.pkl').write_bytes(b'this is not a pickle')
    with pytest.raises(ValueError, match='junk.pkl'):
        load_network_pkl(str(tmp_path / 'junk.pkl'))
    with open(tmp_path / 'noema.pkl', 'wb') as f:
        pickle.dump(dict(net=1), f)
    with pytest.raises(ValueError, match="no 'ema'"):
        load_network_pkl(str(tmp_path / 'noema.pkl'))


def test_a_training_state_given_as_network_says_so_in_one_line(tmp_path):
    path = tmp_path / 'training-state-000010.pt'
    torch.save(dict(net=make_tiny_net(), optimizer_state={}), path)
    with pytest.raises(ValueError) as info:
        load_network_pkl(str(path))
    message = str(info.value)
    assert '\n' not in message and str(path) in message and 'training state' in message and 'network-snapshot' in message


@pytest.mark.parametrize('precond', ['EDMPrecond', 'VPPrecond'])
def test_rebuilt_published_style_pickle_is_identical(tmp_path, precond):
    # Load in a process where training.networks cannot be imported: the network
    # then runs the source embedded in the pickle, as a published pickle does.
    pkl = write_network_pkl(tmp_path / 'net.pkl', make_tiny_net(label_dim=10, precond=precond))
    script = textwrap.dedent(f'''
        import pickle, sys
        sys.modules['training.networks'] = None # block our module
        with open({pkl!r}, 'rb') as f:
            net = pickle.load(f)['ema']
        print(type(net).__module__)
    ''')
    assert run_script(['-c', script]).stdout.strip().startswith('_imported_module_')

    # In this process our module is loaded; a source text that differs from it
    # (as a published pickle's does) is executed as a fresh module.
    from torch_utils import persistence
    def as_published(meta):
        meta.module_src += '\n# a copy of the source, as carried by a published pickle\n'
        return meta
    persistence.import_hook(as_published)
    try:
        net = load_network_pkl(pkl, allow_code=True) # safe loading would rebuild it from our class
    finally:
        persistence._import_hooks.remove(as_published)
    assert type(net).__module__.startswith('_imported_module_')
    rebuilt = rebuild_network(net)
    assert type(rebuilt).__module__ == 'training.networks' and rebuilt is not net
    x = torch.randn([3, 3, 8, 8])
    sigma = torch.tensor([0.1, 1.0, 20.0])
    labels = torch.eye(10)[[1, 4, 9]]
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), rebuilt(x, sigma, labels))
    assert not any(p.requires_grad for p in rebuilt.parameters())


def test_foreign_class_is_left_alone():
    module = torch.nn.Linear(2, 2)
    assert rebuild_network(module) is module
