"""Networks as .safetensors (training/safetensors_io.py): a round trip through
the converter keeps every output bit, generate.py loads the file, and a header
that names another class, other shapes or odd arguments fails in one line."""

import json
import sys

import pytest
import safetensors.torch
import torch

from conftest import make_tiny_net, run_script, write_network_pkl

def _outputs(net):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    labels = torch.eye(net.label_dim)[[1, 3]] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 7.0]), labels)

def test_round_trip_keeps_every_output_and_generate_reads_it(tmp_path):
    from training.convert import convert
    from training.network_io import load_network_pkl
    pkl = write_network_pkl(tmp_path / 'net.pkl', make_tiny_net(label_dim=4))
    convert(str(pkl), str(tmp_path / 'net.safetensors'))
    convert(str(tmp_path / 'net.safetensors'), str(tmp_path / 'back.pkl'))
    ref = load_network_pkl(str(pkl), verbose=False)
    for path in ('net.safetensors', 'back.pkl'):
        net = load_network_pkl(str(tmp_path / path), verbose=False)
        assert type(net) is type(ref) and not net.training and net.init_kwargs == ref.init_kwargs
        assert torch.equal(_outputs(net), _outputs(ref)), path
    with safetensors.safe_open(str(tmp_path / 'net.safetensors'), 'pt') as f:
        assert f.metadata()['class_name'] == 'training.networks.EDMPrecond'
    run_script(['generate.py', '--network', tmp_path / 'net.safetensors', '--outdir', tmp_path / 'out', '--seeds', '0', '--steps', '2',
                '--device', 'cpu'])
    assert (tmp_path / 'out' / '000000.png').stat().st_size > 0 # the same network as the pickle's (outputs compared above)

def _write(path, net, **metadata):
    meta = dict(format='edm-network/1', class_name='training.networks.EDMPrecond', init_args='[]', init_kwargs=json.dumps(dict(net.init_kwargs)))
    meta.update(metadata)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return str(path)

@pytest.mark.parametrize('metadata, words', [
    (dict(class_name='os.system'), ["'os.system'", 'training.networks.EDMPrecond']),
    (dict(class_name='training.networks.iDDPMPrecond'), ['do not fit']),
    (dict(init_kwargs=json.dumps(dict(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=1 << 20,
                                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0))), ['do not fit']),
    (dict(init_kwargs='[' * 60000), ['RecursionError']),
    (dict(init_kwargs='[' * 100000), ['exceed']),
    (dict(format='other'), ['construction arguments']),
])
def test_a_bad_safetensors_header_is_refused(tmp_path, metadata, words):
    from training.network_io import load_network_pkl
    path = _write(tmp_path / 'net.safetensors', make_tiny_net(), **metadata)
    with pytest.raises(ValueError) as info:
        load_network_pkl(path, verbose=False)
    message = str(info.value)
    assert '\n' not in message and path in message and all(w in message for w in words), message

def test_missing_package_is_named(tmp_path, monkeypatch):
    from training.network_io import load_network_pkl
    path = _write(tmp_path / 'net.safetensors', make_tiny_net())
    monkeypatch.setitem(sys.modules, 'safetensors', None) # as if it were not installed
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    with pytest.raises(ValueError, match='pip install safetensors'):
        load_network_pkl(path, verbose=False)
