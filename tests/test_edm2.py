"""EDM2 (Karras et al. 2024) against the published release's numbers
(tests/fixtures/edm2-*, see its README): the networks built by the fixture's
recipe, their outputs, the training-mode forward and the EDM2 loss
gradients, the learning-rate schedule, the post-hoc EMA coefficients; the
release's pickles through the safe loader and generate.py; pickles written
here in the release's layout; and an EDM2 training run that resumes bit for
bit."""

import ast
import glob
import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT, digest, fixture_file, make_tiny_vae, run_script, run_torchrun, single_thread, subprocess_env

import train
from torch_utils import safe_pickle
from training import encoders, generation_edm2, loss_edm2, network_io, networks_edm2, phema

NAMES = ['img16-rgb-cond', 'img8-latent-uncond']
one_thread = pytest.fixture(scope='module', autouse=True)(single_thread) # tiny networks: more threads only contend

@pytest.fixture(scope='module')
def expected():
    with np.load(fixture_file('edm2-expected.npz')) as d:
        return {key: d[key] for key in d.files}

def fixture_kwargs(expected, name):
    return json.loads(bytes(expected[f'{name}/kwargs']).decode())

def recipe_net(expected, name):
    """The fixture's network: constructed under torch.manual_seed(0), then 0.1 * randn added to each parameter in
    order from a generator seeded 1. The global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = networks_edm2.Precond(**fixture_kwargs(expected, name))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net

def inputs(expected, name):
    x, sigma = torch.as_tensor(expected[f'{name}/in/x']), torch.as_tensor(expected[f'{name}/in/sigma'])
    labels = expected.get(f'{name}/in/labels')
    return x, sigma, (torch.as_tensor(labels) if labels is not None else None)

def assert_digest(value, stored, rtol, what, scale_floor=1e-30):
    """value's digest (sum, sum of squares, sampled values) against the stored one, relative to the value's scale
    (its RMS or largest sampled magnitude, at least scale_floor)."""
    got = digest(value)
    scale = max(np.sqrt(stored[1] / max(np.asarray(value).size, 1)), np.abs(stored[2:]).max(), scale_floor)
    np.testing.assert_allclose(got[2:], stored[2:], rtol=0, atol=rtol * scale, err_msg=what)
    np.testing.assert_allclose(got[:2], stored[:2], rtol=rtol * 10, atol=rtol * scale * np.asarray(value).size, err_msg=what)

#----------------------------------------------------------------------------
# Networks, loss, schedule and coefficients against the release.

@pytest.mark.parametrize('name', NAMES)
def test_state_dict_equals_the_release(expected, name):
    net = recipe_net(expected, name)
    state = net.state_dict()
    shapes = {key[len(f'{name}/shape/'):]: value for key, value in expected.items() if key.startswith(f'{name}/shape/')}
    assert list(state) == list(shapes)
    assert all(list(state[key].shape) == list(shapes[key]) for key in state)
    assert sum(p.numel() for p in net.parameters()) == int(expected[f'{name}/num_params'])
    for key, value in state.items():
        np.testing.assert_array_equal(digest(value.numpy()), expected[f'{name}/param_digest/{key}'], err_msg=key)

@pytest.mark.parametrize('name', NAMES)
def test_eval_outputs_and_logvar(expected, name):
    net = recipe_net(expected, name).eval()
    x, sigma, labels = inputs(expected, name)
    with torch.no_grad():
        D, logvar = net(x, sigma, labels, return_logvar=True)
    np.testing.assert_allclose(D.numpy(), expected[f'{name}/eval/D'], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logvar.numpy(), expected[f'{name}/eval/logvar'], rtol=0, atol=1e-5)

@pytest.mark.parametrize('name', NAMES)
def test_training_forward_and_loss_gradients(expected, name):
    net = recipe_net(expected, name).train()
    x, _sigma, labels = inputs(expected, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        loss = loss_edm2.EDM2Loss()(net, images=x * 0.5, labels=labels)
        loss.sum().backward()
    e_loss = expected[f'{name}/train/loss']
    np.testing.assert_allclose(loss.detach().numpy(), e_loss, rtol=0, atol=1e-5 * np.abs(e_loss).max())
    # Gradients within 1e-5 relative to the RMS gradient of the whole network: a scalar gain's gradient sums
    # thousands of float32 products, whose order (threads) moves it by up to 1.0e-5 of itself.
    grads = {key: expected[f'{name}/grad_digest/{key}'] for key, _ in net.named_parameters()}
    rms = np.sqrt(sum(g[1] for g in grads.values()) / sum(p.numel() for p in net.parameters()))
    for key, p in net.named_parameters():
        # Forced weight normalisation: training mode rewrites the MPConv weights in place.
        assert_digest(p.detach().numpy(), expected[f'{name}/param_after_digest/{key}'], 1e-6, f'{key} after the forward')
        assert_digest(p.grad.numpy(), grads[key], 1e-5, f'gradient of {key}', scale_floor=rms)

def test_learning_rate_schedule_is_the_releases(expected):
    for batch in [256, 2048]:
        lrs = [loss_edm2.learning_rate_schedule(int(nimg), batch) for nimg in expected['lr/nimg']]
        np.testing.assert_allclose(lrs, expected[f'lr/batch{batch}'], rtol=1e-12, atol=0)

@pytest.mark.parametrize('case', ['case0', 'case1'])
def test_posthoc_coefficients_are_the_releases(expected, case):
    """Our reconstruction solves for each target separately, with exponents and times; the release's
    coefficients sum to 1 (a weighted average of the stored weights), and so must ours."""
    in_ofs, in_std = np.broadcast_arrays(expected[f'phema/{case}/in_ofs'], expected[f'phema/{case}/in_std'])
    out_ofs, out_std = np.broadcast_arrays(expected[f'phema/{case}/out_ofs'], expected[f'phema/{case}/out_std'])
    gammas = [phema.sigma_rel_to_gamma(std) for std in in_std]
    coefs = np.stack([phema.solve_coefficients(gammas, in_ofs, phema.sigma_rel_to_gamma(std), ofs)[0]
                      for ofs, std in zip(out_ofs, out_std)], axis=1)
    np.testing.assert_allclose(coefs, expected[f'phema/{case}/coefs'], rtol=0, atol=1e-6)
    np.testing.assert_allclose(coefs.sum(axis=0), 1, rtol=0, atol=1e-12)

def test_sigma_rel_to_gamma_is_the_releases(expected):
    for key in [k for k in expected if k.startswith('phema/std_to_exp/')]:
        assert phema.sigma_rel_to_gamma(float(key.rsplit('/', 1)[1])) == pytest.approx(float(expected[key]), rel=1e-12)

#----------------------------------------------------------------------------
# The release's pickles: safe loading, sampling byte for byte.

@pytest.mark.parametrize('name', NAMES)
def test_release_pickles_load_safely(expected, name):
    path = fixture_file(f'edm2-{name}.pkl')
    data = network_io.load_network_data(path, verbose=False) # the safe loader: the embedded source is never run
    assert type(data['ema']) is networks_edm2.Precond
    assert type(data['loss_fn']) is loss_edm2.EDM2Loss and data['loss_fn'].P_mean == -0.4
    assert type(data['encoder']) is encoders.StandardRGBEncoder
    x, sigma, labels = inputs(expected, name)
    with torch.no_grad():
        D = data['ema'](x, sigma, labels)
    np.testing.assert_allclose(D.numpy(), expected[f'{name}/snapshot/D'], rtol=0, atol=1e-5)

SAMPLER_CASES = {'default': {}, 'steps8-churn': dict(num_steps=8, S_churn=10, S_min=0.05, S_max=50),
                 'guided': dict(num_steps=8, guidance=1.7)}

@pytest.fixture(scope='module')
def generated():
    with np.load(fixture_file('edm2-generate.npz')) as d:
        return {key: d[key] for key in d.files}

@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', ['steps8-churn', 'guided'])
def test_edm2_sampler_gives_the_releases_images(generated, name, case):
    data = network_io.load_network_data(fixture_file(f'edm2-{name}.pkl'), verbose=False)
    seeds = [int(s) for s in generated[f'{name}/{case}/seeds']]
    encoder = generation_edm2.default_encoder(data)
    images = [generation_edm2.edm2_images(data['ema'], encoder, [seeds[i] for i in batch], torch.device('cpu'), gnet=data['ema'],
                                          **SAMPLER_CASES[case]) for batch in generation_edm2.edm2_batches(seeds, 4)]
    np.testing.assert_array_equal(torch.cat(images).numpy(), generated[f'{name}/{case}/images'])

def test_generate_writes_the_releases_images(generated, tmp_path):
    """generate.py with the release's defaults for an EDM2 pickle (32 steps, [0.002, 80], its label draw)."""
    name = 'img16-rgb-cond'
    seeds = [int(s) for s in generated[f'{name}/default/seeds']]
    run_script(['generate.py', f'--network={fixture_file(f"edm2-{name}.pkl")}', f'--outdir={tmp_path}', '--batch=4', '--device=cpu',
                f'--seeds={",".join(map(str, seeds))}'])
    images = np.stack([np.asarray(PIL.Image.open(tmp_path / f'{seed:06d}.png')) for seed in seeds]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(images, generated[f'{name}/default/images'])

@pytest.mark.parametrize('allow_code', [False, True])
def test_fid_statistics_of_a_release_pickle(generated, tmp_path, allow_code):
    """fid.py's statistics of an EDM2 pickle's samples are those of the release's images; allow_code=True runs the
    release's own network code carried by the pickle (which the stand-in detector of ours needs for itself)."""
    import fid
    import fid_detector
    detector = fid_detector.ProjectionDetector(feature_dim=8)
    detector_pkl = tmp_path / 'detector.pkl'
    with open(detector_pkl, 'wb') as f:
        pickle.dump(detector, f)
    name, case = 'img16-rgb-cond', 'guided'
    seeds = [int(s) for s in generated[f'{name}/{case}/seeds']]
    mu, sigma = fid.calculate_inception_stats_for_network(fixture_file(f'edm2-{name}.pkl'), seeds, max_batch_size=4, device='cpu',
                                                          detector_url=str(detector_pkl), allow_code=True, num_steps=8,
                                                          gnet_pkl=fixture_file(f'edm2-{name}.pkl'), guidance=1.7) if allow_code else (None, None)
    if not allow_code: # the safe loader refuses the stand-in detector, so here the statistics come from our own sampling
        data = network_io.load_network_data(fixture_file(f'edm2-{name}.pkl'), verbose=False)
        batches = generation_edm2.edm2_image_batches(data['ema'], generation_edm2.default_encoder(data), seeds, torch.device('cpu'), 4,
                                                     num_steps=8, guidance=1.7)
        mu, sigma = fid.accumulate_stats(detector, (torch.as_tensor(images) for _, images in batches), [3, 16, 16], device=torch.device('cpu'))
    features = fid_detector.numpy_features(generated[f'{name}/{case}/images'].transpose(0, 2, 3, 1), detector)
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False, ddof=1), rtol=0, atol=1e-10)

def test_reconstruct_ema_reads_a_release_run(tmp_path):
    """reconstruct_ema.py on a folder in the EDM2 release's layout (network-snapshot-NNNNNNN-S.SSS.pkl). Every
    snapshot holds the same weights, so any reconstruction (a weighted average: coefficients summing to 1) is them."""
    data = network_io.load_network_data(fixture_file('edm2-img16-rgb-cond.pkl'), verbose=False)
    run = tmp_path / 'run'
    run.mkdir()
    for kimg in (1, 2, 4):
        for std in (0.05, 0.1):
            with open(run / f'network-snapshot-{kimg:07d}-{std:.3f}.pkl', 'wb') as f:
                pickle.dump(data, f)
    run_script(['reconstruct_ema.py', f'--run={run}', '--std=0.020,0.075', f'--dest={tmp_path / "out"}'])
    for std in ('0.020', '0.075'):
        out = network_io.load_network_data(str(tmp_path / 'out' / f'reconstructed-000004-{std}.pkl'), verbose=False)
        assert type(out['encoder']) is encoders.StandardRGBEncoder
        for (name, a), (_, b) in zip(out['ema'].named_parameters(), data['ema'].named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=0, msg=name) # float16 weights: one rounding step

def test_stability_vae_encoder_names_what_is_missing(tmp_path):
    """Without diffusers, the latent encoder says so in one line (diffusers hidden from the subprocess)."""
    script = tmp_path / 'decode.py'
    script.write_text('import sys, torch\nsys.modules["diffusers"] = None\nfrom training.encoders import StabilityVAEEncoder\n'
                      'StabilityVAEEncoder().decode(torch.zeros([1, 4, 8, 8]))\n')
    res = run_script([script], check=False, env=dict(subprocess_env(), PYTHONPATH=ROOT))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == ('ImportError: StabilityVAEEncoder needs the diffusers package for the VAE '
                                                   'stabilityai/sd-vae-ft-mse (pip install diffusers)')

def test_stability_vae_encoder_whitens_and_decodes_with_a_local_vae(tmp_path):
    # A VAE folder in place of the default name: the latents are whitened by raw_mean/raw_std -> final_mean/final_std,
    # decoding undoes it, and the pickled encoder carries the name, not the VAE.
    vae = make_tiny_vae(tmp_path / 'vae')
    encoder = encoders.StabilityVAEEncoder(vae_name=str(tmp_path / 'vae'), batch_size=2)
    pixels = torch.randint(0, 256, [3, 3, 16, 16], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean_std = encoder.encode_pixels(pixels)
    assert mean_std.shape == (3, 8, 8, 8)
    with torch.no_grad():
        dist = vae.encode(pixels.to(torch.float32) / 255)['latent_dist']
    torch.testing.assert_close(mean_std, torch.cat([dist.mean, dist.std], dim=1))
    mean = torch.cat([dist.mean, torch.zeros_like(dist.std)], dim=1) # std 0: the draw is the mean
    latents = encoder.encode_latents(mean)
    raw_mean, raw_std = torch.tensor([5.81, 3.25, 0.12, -2.15]), torch.tensor([4.17, 4.62, 3.71, 3.28])
    torch.testing.assert_close(latents, (dist.mean - raw_mean.reshape(1, 4, 1, 1)) / raw_std.reshape(1, 4, 1, 1) * 0.5)
    restored = pickle.loads(pickle.dumps(encoder))
    assert restored._vae is None and restored.vae_name == str(tmp_path / 'vae')
    with torch.no_grad():
        expected = (vae.decode(dist.mean)['sample'].clamp(0, 1) * 255).to(torch.uint8)
    images = restored.decode(latents)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert (images.int() - expected.int()).abs().max() <= 1 # float rounding of the whitening round trip

def test_stability_vae_encoder_loads_no_pickled_weights(tmp_path):
    """A VAE folder whose weights are a pickle (diffusion_pytorch_model.bin) is refused in one line; the pickle never runs."""
    make_tiny_vae(tmp_path / 'vae', safe_serialization=False)
    marker = tmp_path / 'pwned'
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    with open(tmp_path / 'vae' / 'diffusion_pytorch_model.bin', 'wb') as f:
        pickle.dump(Payload(), f)
    script = tmp_path / 'decode.py'
    script.write_text('import sys, torch\nfrom training.encoders import StabilityVAEEncoder\n'
                      f'StabilityVAEEncoder(vae_name={str(tmp_path / "vae")!r}).decode(torch.zeros([1, 4, 8, 8]))\n')
    res = run_script([script], check=False)
    assert res.returncode != 0 and not marker.exists()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f'OSError: StabilityVAEEncoder: {tmp_path / "vae"} holds no AutoencoderKL with safetensors weights'), last

#----------------------------------------------------------------------------
# Pickles written here hold what the release's pickles hold.

def persistent_objects(pickle_bytes):
    """Sorted [(class name, init_kwargs as JSON, module source)] of every persistent object in a pickle (nested ones
    too), read with the safe loader's globals and a recorder in place of the reconstruction hook."""
    objects = []
    def record(meta):
        objects.append((meta['class_name'], json.dumps(meta['state'].get('_init_kwargs'), sort_keys=True), meta['module_src']))
    class Recorder(safe_pickle.SafeUnpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return record
            return super().find_class(module, name)
        def load_reduce(self):
            if self.stack[-2] is record:
                args = self.stack.pop()
                self.stack[-1] = record(*args)
                return
            super().load_reduce()
        dispatch = dict(safe_pickle.SafeUnpickler.dispatch)
        dispatch[pickle.REDUCE[0]] = load_reduce
    Recorder(io.BytesIO(pickle_bytes), 'the pickle').load()
    return sorted(objects)

def top_level_imports(src):
    tree = ast.parse(src)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names

@pytest.mark.parametrize('name', NAMES)
def test_pickle_written_here_has_the_releases_classes_and_arguments(expected, name):
    with open(fixture_file(f'edm2-{name}.pkl'), 'rb') as f:
        theirs = persistent_objects(f.read())
    ours_data = dict(ema=recipe_net(expected, name).eval().requires_grad_(False), loss_fn=loss_edm2.EDM2Loss(),
                     encoder=encoders.StandardRGBEncoder(), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'))
    ours = persistent_objects(pickle.dumps(ours_data))
    assert len(ours) > 10 # Precond, UNet, its blocks and layers, EDM2Loss, StandardRGBEncoder
    assert [(cls, kwargs) for cls, kwargs, _src in ours] == [(cls, kwargs) for cls, kwargs, _src in theirs]
    for cls, _kwargs, src in ours:
        # The embedded source defines the class and imports only what the release also has.
        assert f'class {cls}' in src
        assert top_level_imports(src) <= {'os', 'numpy', 'torch', 'torch_utils.persistence'}, cls

#----------------------------------------------------------------------------
# Training with --preset: the recipe in the config, and exact resumption.

def test_preset_builds_the_edm2_recipe():
    dataset = dict(name='d', resolution=64, num_channels=3, size=100, has_labels=True)
    opts = train.apply_preset(train.default_options(outdir='runs', data='x.zip', cond=True, preset='edm2-img64-s', seed=0, lr=0.02),
                              given={'outdir', 'data', 'cond', 'preset', 'seed', 'lr'})
    c, desc = train.build_config(opts, train.dnnlib.EasyDict(dataset), device_type='cuda')
    assert c.network_kwargs == dict(class_name='training.networks_edm2.Precond', model_channels=192, dropout=0.0, use_fp16=True)
    assert c.loss_kwargs == dict(class_name='training.loss_edm2.EDM2Loss', P_mean=-0.8, P_std=1.6)
    assert c.optimizer_kwargs == dict(class_name='torch.optim.Adam', lr=0.02, betas=[0.9, 0.99], eps=1e-8) # --lr overrides
    assert c.lr_kwargs == dict(func_name='training.loss_edm2.learning_rate_schedule', ref_lr=0.02, ref_batches=35000, rampup_Mimg=10)
    assert c.phema_kwargs.stds == [0.05, 0.1] and 'augment_kwargs' not in c
    assert c.batch_size == 2048 and c.total_kimg == (1024 << 20) // 1000
    assert 'edm2-img64-s' in desc

def _tiny_dataset(path):
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(16):
            buf = io.BytesIO()
            PIL.Image.fromarray(rnd.randint(0, 256, size=[8, 8, 3], dtype=np.uint8)).save(buf, format='png')
            z.writestr(f'img{i:08d}.png', buf.getvalue())
        z.writestr('dataset.json', json.dumps({'labels': [[f'img{i:08d}.png', i % 4] for i in range(16)]}))
    return str(path)

def test_edm2_run_resumes_bit_for_bit(tmp_path):
    data = _tiny_dataset(tmp_path / 'tiny.zip')
    args = ['train.py', f'--data={data}', '--cond=1', '--preset=edm2-img64-s', '--cbase=8', '--cres=1,2', '--batch=32',
            '--tick=1', '--snap=100', '--dump=1', '--lr-rampup=1', '--seed=0', '--workers=0', '--device=cpu']
    run_script(args + [f'--outdir={tmp_path / "full"}', '--duration=0.002'])
    run_script(args + [f'--outdir={tmp_path / "split"}', '--duration=0.001'])
    (first,) = glob.glob(str(tmp_path / 'split' / '0*'))
    run_script(args + [f'--outdir={tmp_path / "split"}', '--duration=0.002', f'--resume={first}'])
    (full,) = glob.glob(str(tmp_path / 'full' / '0*'))
    a = torch.load(os.path.join(full, 'training-state-000002.pt'), map_location='cpu', weights_only=False)
    b = torch.load(os.path.join(first, 'training-state-000002.pt'), map_location='cpu', weights_only=False)
    for key in ('net', 'ema'):
        for (na, ta), (nb, tb) in zip(a[key].state_dict().items(), b[key].state_dict().items()):
            assert na == nb and torch.equal(ta, tb), f'{key}.{na}'
    snapshot = network_io.load_network_data(os.path.join(full, 'network-snapshot-000002.pkl'), verbose=False)
    assert type(snapshot['ema']) is networks_edm2.Precond and type(snapshot['encoder']) is encoders.StandardRGBEncoder
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(full, 'phema-000002-*.pkl'))) == \
        ['phema-000002-0.050.pkl', 'phema-000002-0.100.pkl']
    with open(os.path.join(full, 'log.txt')) as f:
        assert 'tick 2' in f.read() # progress lines as for EDM runs

    # A run stopped between its last state dump and its last snapshot: resuming writes that snapshot, encoder included.
    os.remove(os.path.join(full, 'network-snapshot-000002.pkl'))
    res = run_script(args + [f'--outdir={tmp_path / "full"}', '--duration=0.002', f'--resume={full}'])
    assert 'Wrote the missing final snapshot' in res.stdout
    again = network_io.load_network_data(os.path.join(full, 'network-snapshot-000002.pkl'), verbose=False)
    assert type(again['encoder']) is encoders.StandardRGBEncoder
    for (na, ta), (nb, tb) in zip(snapshot['ema'].state_dict().items(), again['ema'].state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na

def test_edm2_run_under_torchrun_trains_one_network_on_both_ranks(tmp_path):
    # 2 processes (gloo): the forced weight normalisation and the learned uncertainty under DistributedDataParallel.
    data = _tiny_dataset(tmp_path / 'tiny.zip')
    res = run_torchrun(['train.py', f'--data={data}', '--cond=1', '--preset=edm2-img64-s', '--cbase=8', '--cres=1,2', '--batch=32',
                        '--tick=1', '--snap=1', '--dump=1', '--lr-rampup=1', '--seed=0', '--workers=0', '--label-dropout=0.1',
                        '--duration=0.001', f'--outdir={tmp_path}', '--device=cpu'])
    assert res.stdout.count('tick 1 ') == 1 # rank 0 prints
    (run_dir,) = glob.glob(str(tmp_path / '0*'))
    assert {'phema-000001-0.050.pkl', 'phema-000001-0.100.pkl', 'samples-000001.png'} <= set(os.listdir(run_dir))
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    assert sum(line['Loss/loss']['num'] for line in stats) == 32 * 32 * 3 * 8 * 8 # both ranks' losses: 32 steps of 32 images
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), map_location='cpu', weights_only=False)
    assert len(state['rng_states']) == 2
    snapshot = network_io.load_network_data(os.path.join(run_dir, 'network-snapshot-000001.pkl'), verbose=False)
    for (na, ta), (nb, tb) in zip(snapshot['ema'].state_dict().items(), state['ema'].state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na

def _latent_dataset(path, num=16):
    """A zip in the layout of EDM2's dataset_tool.py encode: [mean, std] of 4 latent channels per image as .npy, and labels."""
    rnd = np.random.RandomState(1)
    labels = []
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(num):
            mean_std = np.concatenate([rnd.randn(4, 8, 8) * 4 + 2, np.abs(rnd.randn(4, 8, 8)) * 0.2]).astype(np.float32)
            buf = io.BytesIO()
            np.save(buf, mean_std)
            name = f'{i:08d}'[:5] + f'/img-mean-std-{i:08d}.npy'
            z.writestr(name, buf.getvalue())
            labels.append([name, i % 4])
        z.writestr('dataset.json', json.dumps({'labels': labels}))
    return str(path)

def test_edm2_run_trains_on_vae_latents_and_resumes_bit_for_bit(tmp_path):
    # 8-channel latents (EDM2's ImageNet-512 datasets): StabilityVAEEncoder draws the network's 4-channel data from each
    # mean and std; without the VAE (diffusers or its weights) the run trains and says that it writes no sample grid.
    data = _latent_dataset(tmp_path / 'latents.zip')
    args = ['train.py', f'--data={data}', '--cond=1', '--preset=edm2-img512-xs', '--cbase=8', '--cres=1,2', '--batch=16',
            '--tick=0.5', '--snap=1', '--dump=1', '--lr-rampup=1', '--seed=0', '--workers=0', '--device=cpu']
    res = run_script(args + [f'--outdir={tmp_path / "full"}', '--duration=0.001'])
    assert 'No sample grid with this snapshot: StabilityVAEEncoder' in res.stdout # no diffusers, or no VAE weights (offline)
    run_script(args + [f'--outdir={tmp_path / "split"}', '--duration=0.0005'])
    (first,) = glob.glob(str(tmp_path / 'split' / '0*'))
    run_script(args + [f'--outdir={tmp_path / "split"}', '--duration=0.001', f'--resume={first}'])
    (full,) = glob.glob(str(tmp_path / 'full' / '0*'))
    snapshot = network_io.load_network_data(os.path.join(full, 'network-snapshot-000001.008.pkl'), verbose=False)
    assert snapshot['ema'].img_channels == 4 and snapshot['ema'].img_resolution == 8
    assert type(snapshot['encoder']) is encoders.StabilityVAEEncoder
    a = torch.load(os.path.join(full, 'training-state-000001.008.pt'), map_location='cpu', weights_only=False)
    b = torch.load(os.path.join(first, 'training-state-000001.008.pt'), map_location='cpu', weights_only=False)
    for (na, ta), (nb, tb) in zip(a['net'].state_dict().items(), b['net'].state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na

def test_latent_files_are_checked(tmp_path):
    from training.dataset import ImageFolderDataset
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'a.npy').write_bytes(b'\x93NUMPY not really')
    with pytest.raises(ValueError, match='a.npy: not a readable .npy array'):
        ImageFolderDataset(str(tmp_path / 'bad'))
    (tmp_path / 'obj').mkdir()
    np.save(tmp_path / 'obj' / 'a.npy', np.array([{'x': 1}], dtype=object), allow_pickle=True) # would unpickle
    with pytest.raises(ValueError, match='a.npy: not a readable .npy array'):
        ImageFolderDataset(str(tmp_path / 'obj'))
    (tmp_path / 'mixed').mkdir()
    np.save(tmp_path / 'mixed' / 'a.npy', np.zeros([8, 4, 4], np.float32))
    PIL.Image.fromarray(np.zeros([4, 4, 3], np.uint8)).save(tmp_path / 'mixed' / 'b.png')
    with pytest.raises(ValueError, match='both images and .npy latents'):
        ImageFolderDataset(str(tmp_path / 'mixed'))

#----------------------------------------------------------------------------
