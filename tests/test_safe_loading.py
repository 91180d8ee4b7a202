"""Safe loading: network pickles, training states and detectors load without running the code they
carry; --allow-code (allow_code=True) restores full unpickling."""

import builtins
import io
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import ROOT, fixture_file, run_script

DEMO_PKL = os.path.join(ROOT, 'demo', 'edm-digits-16x16-cond.pkl')

#----------------------------------------------------------------------------
# Pickles rewritten at the level of their persistent objects, without running their source.

class _Persistent:
    """A persistent object read back as its meta dict; pickles again as the same reduce call."""
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        from torch_utils import persistence
        return (persistence._reconstruct_persistent_obj, (self.meta,))

class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return _Persistent
        return super().find_class(module, name)

def _edit_sources(raw, edit):
    """The pickle `raw` with every embedded module source passed through edit(src)."""
    data = _MetaUnpickler(io.BytesIO(raw)).load()
    seen = set() # an object referenced twice is edited once
    def visit(obj):
        if isinstance(obj, _Persistent) and id(obj) not in seen:
            seen.add(id(obj))
            obj.meta['module_src'] = edit(obj.meta['module_src'])
            visit(obj.meta['state'])
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)
        elif isinstance(obj, torch.nn.Module): # torch's containers (ModuleDict) hold persistent objects too
            visit(vars(obj))
    visit(data)
    return pickle.dumps(data)

class _ExecPayload:
    """Runs `code` when unpickled (the classic __reduce__ payload)."""
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))

def _touch_code(marker):
    return f'open({str(marker)!r}, "w").close()'

#----------------------------------------------------------------------------
# Payloads through a real generate.py.

def _generate(pkl, outdir, *extra):
    return run_script(['generate.py', '--network', pkl, '--outdir', outdir, '--seeds', '0-1', '--steps', '2', '--device', 'cpu',
                       *extra], check=False)

def test_reduce_payload_runs_only_with_allow_code(tmp_path):
    marker = tmp_path / 'marker'
    with open(DEMO_PKL, 'rb') as f:
        data = pickle.load(f)
    data['note'] = _ExecPayload(_touch_code(marker))
    pkl = tmp_path / 'payload.pkl'
    pkl.write_bytes(pickle.dumps(data))

    res = _generate(pkl, tmp_path / 'out')
    assert res.returncode != 0 and not marker.exists()
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith('Error: ') and str(pkl) in error and 'builtins.exec' in error and '--allow-code' in error

    res = _generate(pkl, tmp_path / 'out', '--allow-code')
    assert res.returncode == 0 and marker.exists(), res.stderr

def test_edited_source_runs_only_with_allow_code(tmp_path):
    marker = tmp_path / 'marker'
    with open(DEMO_PKL, 'rb') as f:
        raw = f.read()
    pkl = tmp_path / 'edited.pkl'
    pkl.write_bytes(_edit_sources(raw, lambda src: src + '\n' + _touch_code(marker) + '\n'))

    res = _generate(pkl, tmp_path / 'safe')
    assert res.returncode == 0 and not marker.exists(), res.stderr
    res_ref = _generate(DEMO_PKL, tmp_path / 'ref')
    assert res_ref.returncode == 0, res_ref.stderr
    for name in ('000000.png', '000001.png'):
        assert (tmp_path / 'safe' / name).read_bytes() == (tmp_path / 'ref' / name).read_bytes()

    res = _generate(pkl, tmp_path / 'code', '--allow-code')
    assert res.returncode == 0 and marker.exists(), res.stderr

#----------------------------------------------------------------------------
# The five architecture / preconditioning configurations of the paper, small.

_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
               channel_mult_noise=1, resample_filter=[1,1], model_channels=16, channel_mult=[1,2], num_blocks=1, attn_resolutions=[4])
_NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
               channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=16, channel_mult=[1,2], num_blocks=1, attn_resolutions=[4])
_ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1,2], num_blocks=1, attn_resolutions=[4])
CONFIGS = {
    'vp-ddpmpp':    ('VPPrecond', _DDPMPP, 'VPLoss'),
    've-ncsnpp':    ('VEPrecond', _NCSNPP, 'VELoss'),
    'iddpm-adm':    ('iDDPMPrecond', _ADM, 'EDMLoss'),
    'edm-ddpmpp':   ('EDMPrecond', _DDPMPP, 'EDMLoss'),
    'edm-adm':      ('EDMPrecond', _ADM, 'EDMLoss'),
}

def _make_pickle(config):
    from training import augment, loss, networks
    precond, kwargs, loss_name = CONFIGS[config]
    torch.manual_seed(0)
    net = getattr(networks, precond)(img_resolution=8, img_channels=3, label_dim=4, dropout=0, augment_dim=9, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    data = dict(ema=net.eval().requires_grad_(False), loss_fn=getattr(loss, loss_name)(),
                augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, scale=1), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset'))
    return pickle.dumps(data)

def _outputs(net):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn([2, 3, 8, 8], generator=gen)
    sigma = torch.tensor([0.5, 20.0], dtype=torch.float64)
    labels = torch.eye(4)[[1, 3]]
    augment_labels = torch.randn([2, 9], generator=gen)
    with torch.no_grad():
        return net(x, sigma, labels, augment_labels=augment_labels)

@pytest.mark.parametrize('config', list(CONFIGS))
def test_configurations_load_safely_with_identical_outputs(config):
    from torch_utils import persistence
    raw = _make_pickle(config)
    full = pickle.loads(raw) # today's loading: runs the embedded source
    # The reference's source is another text than ours: the class name and module decide, the text is not run.
    reference_like = _edit_sources(raw, lambda src: '# another text of the same module\n' + src.replace('"""', "'''"))
    for blob in (raw, reference_like):
        safe = persistence.load(io.BytesIO(blob))
        assert type(safe['ema']).__module__ == 'training.networks' and type(safe['ema']).__name__ == CONFIGS[config][0]
        assert type(safe['loss_fn']).__module__ == 'training.loss' and type(safe['augment_pipe']).__module__ == 'training.augment'
        assert torch.equal(_outputs(safe['ema']), _outputs(full['ema']))
        assert vars(safe['loss_fn']) == vars(full['loss_fn']) and vars(safe['augment_pipe']) == vars(full['augment_pipe'])
        assert safe['ema'].init_kwargs == full['ema'].init_kwargs

#----------------------------------------------------------------------------
# The persistence fixture: a module unknown to us.

def test_unknown_persistent_module_needs_allow_code():
    from torch_utils import persistence
    from training.network_io import load_network_pkl
    path = fixture_file('persistence-v6.pkl')
    with pytest.raises(ValueError) as info:
        load_network_pkl(path)
    message = str(info.value)
    assert '\n' not in message and path in message and 'TinyBlock' in message and '--allow-code' in message
    with open(path, 'rb') as f:
        data = persistence.load(f, allow_code=True)
    assert type(data['net']).__name__ == 'TinyNet' and data['net'].init_kwargs['label'] == 'fixture'

#----------------------------------------------------------------------------
# Training states.

def _reference_state(tmp_path, extra):
    from training import augment, loss
    from conftest import make_tiny_net
    net = make_tiny_net().train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn([2, 3, 8, 8]), torch.ones([2])).square().mean().backward()
    optimizer.step()
    state = dict(net=net, loss_fn=loss.EDMLoss(), optimizer_state=optimizer.state_dict(), augment_pipe=augment.AugmentPipe(p=0.1), **extra)
    path = tmp_path / 'training-state-000001.pt'
    torch.save(state, path)
    return path, state

def test_training_states_load_safely(tmp_path):
    from training.training_loop import load_state_dump
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=__import__('random').getstate())
    ours = dict(ema=None, cur_nimg=1000, sampler_state=dict(idx=3, order=np.arange(5), rnd_state=np.random.RandomState(0).get_state()),
                rng_states=[rng], loss_scale=None)
    for extra in ({}, ours): # the reference's keys, then ours
        path, state = _reference_state(tmp_path, extra)
        loaded = load_state_dump(str(path))
        assert type(loaded['net']).__module__ == 'training.networks'
        for (name, a), (_, b) in zip(loaded['net'].state_dict().items(), state['net'].state_dict().items()):
            assert torch.equal(a, b), name
        assert torch.equal(loaded['optimizer_state']['state'][0]['exp_avg'], state['optimizer_state']['state'][0]['exp_avg'])
    assert np.array_equal(loaded['rng_states'][0]['numpy'][1], rng['numpy'][1])

def test_training_state_payload_is_refused(tmp_path):
    from training.training_loop import load_state_dump
    marker = tmp_path / 'marker'
    path, _ = _reference_state(tmp_path, dict(note=_ExecPayload(_touch_code(marker))))
    with pytest.raises(ValueError, match='builtins.exec.*--allow-code'):
        load_state_dump(str(path))
    assert not marker.exists()
    load_state_dump(str(path), allow_code=True)
    assert marker.exists()

#----------------------------------------------------------------------------
# Detectors.

class _ScriptDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer('weight', torch.linspace(-1, 1, 3 * 4 * 4 * 8).reshape(48, 8))

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 4)
        return x.flatten(1) @ self.weight

def test_detectors_load_safely_or_are_refused(tmp_path):
    import fid
    import fid_detector
    pkl = tmp_path / 'detector.pkl'
    pkl.write_bytes(pickle.dumps(fid_detector.ProjectionDetector(feature_dim=8)))
    with pytest.raises(ValueError, match='ProjectionDetector.*--allow-code'):
        fid.load_detector(str(pkl), device='cpu', verbose=False)
    assert fid.load_detector(str(pkl), device='cpu', verbose=False, allow_code=True).weight.shape == (48, 8)

    # TorchScript is code too (it can create and overwrite files): refused without --allow-code, told by its content.
    scripted = tmp_path / 'detector.pt'
    torch.jit.save(torch.jit.script(_ScriptDetector()), str(scripted))
    with pytest.raises(ValueError, match='TorchScript.*--allow-code'):
        fid.load_detector(str(scripted), device='cpu', verbose=False)
    detector = fid.load_detector(str(scripted), device='cpu', verbose=False, allow_code=True)
    images = torch.randint(0, 256, [2, 3, 8, 8], dtype=torch.uint8)
    assert torch.equal(detector(images, return_features=True), _ScriptDetector()(images))
