"""Networks and preconditioners against the reference fixtures (net-*.npz):
parameter names, outputs, gradients, pickles, and the optional fast paths."""

import ast
import json
import pickle

import numpy as np
import pytest
import torch

from conftest import digest, fixture_file, make_recipe_net, run_script, sample_indices, write_network_pkl
from training import fast_layers, networks

NET_FIXTURES = [
    'net-edm-adm-uncond-aug',
    'net-edm-ddpmpp-cond-aug',
    'net-iddpm-adm-cond',
    'net-ve-ncsnpp-uncond-gray',
    'net-vp-songunet-skip-cond',
]

OUT_TOL = 1e-5      # Max abs error relative to max |reference| (outputs, grad_x).
GRAD_TOL = 2e-5     # The same, per parameter gradient tensor (float32 reductions).

#----------------------------------------------------------------------------

def load_fixture(name):
    return np.load(fixture_file(f'{name}.npz'))

def build_net(d, **overrides):
    """Network from the fixture config with the reference's parameters (made by the fixture's recipe, see
    tests/fixtures/README.md) and buffers, loaded strictly."""
    meta = json.loads(str(d['meta']))
    net = make_recipe_net(meta['config'], json.loads(str(d['init'])))
    state = net.state_dict()
    state.update({k[len('buffer/'):]: torch.from_numpy(d[k]) for k in d.files if k.startswith('buffer/')})
    if overrides:
        config = dict(meta['config'], **overrides)
        net = getattr(networks, config.pop('class_name'))(**config)
    net.load_state_dict(state, strict=True)
    return net, meta

def sampled(tensor):
    """The entries of `tensor` that the fixtures keep (conftest.sample_indices)."""
    return tensor.detach().flatten()[torch.from_numpy(sample_indices(tensor.numel()))]

def net_inputs(d):
    """(x, sigma, class_labels or None, model kwargs) as the fixture used them."""
    x = torch.from_numpy(d['x'])
    sigma = torch.from_numpy(d['sigma'])
    labels = torch.from_numpy(d['class_labels'])
    kwargs = dict(augment_labels=torch.from_numpy(d['augment_labels'])) if 'augment_labels' in d.files else {}
    return x, sigma, (labels if labels.shape[1] else None), kwargs

def rel_err(actual, expected):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().cpu().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    actual = actual.detach().to(torch.float64).cpu().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())

def fixture_gradients(net, d):
    """Gradients of sum(out * grad_weight) w.r.t. x and every parameter, in train mode."""
    x, sigma, labels, kwargs = net_inputs(d)
    x = x.clone().requires_grad_(True)
    net.train().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out = net(x, sigma, labels, **kwargs)
    (out * torch.from_numpy(d['grad_weight'])).sum().backward()
    return x.grad, {name: p.grad for name, p in net.named_parameters()}

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', NET_FIXTURES)
def test_fixture_names_shapes_and_constants(name):
    d = load_fixture(name)
    net, meta = build_net(d)
    expected = {k[len('shape/'):]: tuple(d[k].tolist()) for k in d.files if k.startswith('shape/')}
    actual = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert list(actual) == list(expected)
    assert actual == expected
    assert sum(p.numel() for p in net.parameters()) == meta['num_params']
    # VP's sigma(t) and iDDPM's u are computed in float32 (iDDPM by a recurrence over M steps), which
    # PyTorch releases may round differently: a relative round-off of about eps (1 + sigma^-2) per
    # step, since sigma = sqrt(a - 1) cancels when sigma is small. VE and EDM keep their arguments.
    steps = net.M if isinstance(net, networks.iDDPMPrecond) else 4
    for key in ['sigma_min', 'sigma_max']:
        expected = meta[key]
        tol = float(steps * np.finfo(np.float32).eps * (1 + expected ** -2)) if 0 < expected < np.inf else 0
        assert getattr(net, key) == pytest.approx(expected, rel=tol, abs=0), key

@pytest.mark.parametrize('name', NET_FIXTURES)
def test_fixture_recipe_gives_the_reference_parameters(name):
    # Sums, sums of squares and sampled values of the reference's parameters (float32 round-off allowed).
    d = load_fixture(name)
    net, _ = build_net(d)
    params = dict(net.named_parameters())
    assert {k[len('param_digest/'):] for k in d.files if k.startswith('param_digest/')} == set(params)
    for name, p in params.items():
        np.testing.assert_allclose(digest(p.detach().numpy()), d[f'param_digest/{name}'], rtol=1e-6, atol=0, err_msg=name)

@pytest.mark.parametrize('name', NET_FIXTURES)
def test_network_outputs_match_the_reference(name):
    d = load_fixture(name)
    net, _ = build_net(d)
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        out = net.eval()(x, sigma, labels, **kwargs)
        out_without_labels = net(x, sigma, None, **kwargs)
    assert out.dtype == torch.float32 and out.shape == d['out'].shape
    assert rel_err(out, d['out']) < OUT_TOL
    assert rel_err(out_without_labels, d['out_without_labels']) < OUT_TOL

@pytest.mark.parametrize('name', NET_FIXTURES)
def test_network_gradients_match_the_reference(name):
    d = load_fixture(name)
    net, _ = build_net(d)
    grad_x, grads = fixture_gradients(net, d)
    assert rel_err(grad_x, d['grad_x']) < OUT_TOL
    expected = {k[len('grad/'):] for k in d.files if k.startswith('grad/')}
    assert set(grads) == expected
    errors = {n: rel_err(sampled(g), d[f'grad/{n}']) for n, g in grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOL, f'{worst}: {errors[worst]:.3g}'

def test_iddpm_round_sigma_matches_the_reference():
    d = load_fixture('net-iddpm-adm-cond')
    net, _ = build_net(d)
    sigma = torch.from_numpy(d['round_sigma_in'])
    rounded = net.round_sigma(sigma)
    index = net.round_sigma(sigma, return_index=True)
    assert rounded.shape == sigma.shape and rounded.dtype == sigma.dtype
    np.testing.assert_array_equal(rounded.numpy(), d['round_sigma_out'])
    np.testing.assert_array_equal(index.numpy(), d['round_sigma_index'])
    # Shape and dtype are kept for other inputs too; values are entries of u.
    grid = net.round_sigma(torch.tensor([[0.5, 3.0], [80.0, 0.01]], dtype=torch.float64))
    assert grid.shape == (2, 2) and grid.dtype == torch.float64
    assert all(float(v) in set(net.u.tolist()) for v in grid.flatten().float())

def test_vp_sigma_inv_inverts_sigma():
    net = networks.VPPrecond(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    np.testing.assert_allclose(net.sigma_inv(net.sigma(t)).numpy(), t.numpy(), rtol=1e-12)

#----------------------------------------------------------------------------
# Pickles.

CHILD_LOAD = '''
import pickle, sys
import numpy as np, torch
sys.modules['training'] = None # The pickle must carry the network source itself, and need no other module of ours.
pkl, inputs, result = sys.argv[1:4]
with open(pkl, 'rb') as f:
    net = pickle.load(f)['ema']
d = np.load(inputs)
with torch.no_grad():
    out = net(torch.from_numpy(d['x']), torch.from_numpy(d['sigma']))
np.savez(result, out=out.numpy(), module=type(net).__module__, init_kwargs=repr(sorted(net.init_kwargs.items())))
'''

def test_pickle_loads_in_fresh_process(tmp_path):
    d = load_fixture('net-ve-ncsnpp-uncond-gray')
    net, meta = build_net(d)
    net = net.eval().requires_grad_(False)
    x, sigma, _, _ = net_inputs(d)
    with torch.no_grad():
        expected = net(x, sigma)
    pkl = write_network_pkl(tmp_path / 'net.pkl', net)
    np.savez(tmp_path / 'inputs.npz', x=d['x'], sigma=d['sigma'])
    run_script(['-c', CHILD_LOAD, pkl, tmp_path / 'inputs.npz', tmp_path / 'result.npz'])
    result = np.load(tmp_path / 'result.npz')
    assert str(result['module']).startswith('_imported_module_')
    config = dict(meta['config'])
    config.pop('class_name')
    assert str(result['init_kwargs']) == repr(sorted(config.items()))
    np.testing.assert_allclose(result['out'], expected.numpy(), rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert rel_err(torch.from_numpy(result['out']), d['out']) < OUT_TOL

def test_networks_module_imports_only_what_the_reference_has():
    # Pickles carry networks.py's source, which the reference release executes in its own tree.
    allowed = {'contextlib', 'numpy', 'torch', 'torch.nn.functional', 'torch_utils', 'torch_utils.persistence', 'torch_utils.misc', 'dnnlib'}
    tree = ast.parse(open(networks.__file__, encoding='utf-8').read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported and imported <= allowed, imported - allowed

def test_pickle_roundtrip_in_process_keeps_fast_paths():
    d = load_fixture('net-edm-ddpmpp-cond-aug')
    net, _ = build_net(d)
    assert fast_layers.set_fast_paths(net) > 0
    clone = pickle.loads(pickle.dumps(net.eval()))
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        assert torch.equal(clone(x, sigma, labels, **kwargs), net(x, sigma, labels, **kwargs))
    assert [m.fast_paths for m in clone.modules() if hasattr(m, 'fast_paths')] == [m.fast_paths for m in net.modules() if hasattr(m, 'fast_paths')]

#----------------------------------------------------------------------------
# Published configurations (reference parameter counts).

def test_full_size_cifar10_ddpmpp_param_count():
    net = networks.VPPrecond(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_type='SongUNet',
                             embedding_type='positional', encoder_type='standard', decoder_type='standard',
                             channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
    assert sum(p.numel() for p in net.parameters()) == 55_735_299

@pytest.mark.slow
def test_full_size_imagenet64_adm_param_count():
    net = networks.EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
                              model_channels=192, channel_mult=[1, 2, 3, 4])
    assert sum(p.numel() for p in net.parameters()) == 295_899_267

#----------------------------------------------------------------------------
# Attention: float32 softmax, and the opt-in SDPA path.

def attention_inputs(dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn([6, 16, 20], generator=gen) * scale for _ in range(3))
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)]

def attention_closed_form(q, k, v):
    """softmax_j(q_i . k_j / sqrt(c)) v_j in float64."""
    q, k, v = (t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v))
    w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(q.shape[1])).softmax(dim=2)
    return torch.einsum('nqk,nck->ncq', w, v), (q, k, v)

def attention_closed_form_heads(qkv, num_heads):
    """attention_closed_form of each head of qkv [N, 3*C, H, W] (channels ordered head, channel, q|k|v), as [N, C, H, W]."""
    N, C, H, W = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
    q, k, v = qkv.to(torch.float64).reshape(N * num_heads, C // num_heads, 3, H * W).unbind(2)
    w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(q.shape[1])).softmax(dim=2)
    return torch.einsum('nqk,nck->ncq', w, v).reshape(N, C, H, W)

@pytest.mark.parametrize('channels_last', [False, True])
def test_fast_attention_matches_closed_form(channels_last):
    # SDPA on [N*heads, 1, L, C] or, for channels-last qkv, on pixel-major views; outputs and gradients.
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn([2, 3 * 32, 4, 5], generator=gen, dtype=torch.float64)
    if channels_last:
        qkv = qkv.to(memory_format=torch.channels_last)
    g = torch.randn([2, 32, 4, 5], generator=gen, dtype=torch.float64)
    qkv32, qkv64 = qkv.float().requires_grad_(True), qkv.detach().requires_grad_(True)
    a = fast_layers.attention_heads(qkv32, num_heads=2)
    (a * g.float()).sum().backward()
    a_ref = attention_closed_form_heads(qkv64, num_heads=2)
    (a_ref * g).sum().backward()
    assert a.dtype == torch.float32 and a.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(a, a_ref) < 1e-5
    assert rel_err(qkv32.grad, qkv64.grad) < 1e-5

def test_attention_weights_float32_then_rounded_for_bfloat16_inputs():
    # Large logits: a bfloat16 softmax would be off by far more than one bfloat16 rounding.
    q, k, _ = attention_inputs(torch.bfloat16, scale=3.0)
    w = networks.AttentionOp.apply(q, k)
    q64, k64 = (t.detach().double() for t in (q, k))
    w64 = torch.einsum('ncq,nck->nqk', q64, k64 / np.sqrt(q.shape[1])).softmax(dim=2)
    g = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    (w.float() * g.float()).sum().backward()
    eps = 2.0 ** -8 # bfloat16 rounding
    assert w.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(w.double().detach().numpy(), w64.detach().numpy(), rtol=eps, atol=1e-30)
    # The backward pass works in float32 from the weights as returned (rounded to bfloat16), as the reference's does.
    w_r, g64 = w.detach().double(), g.double()
    db = w_r * (g64 - (g64 * w_r).sum(dim=2, keepdim=True))
    assert rel_err(q.grad, torch.einsum('nck,nqk->ncq', k64, db) / np.sqrt(q.shape[1])) < 2 * eps
    assert rel_err(k.grad, torch.einsum('ncq,nqk->nck', q64, db) / np.sqrt(q.shape[1])) < 2 * eps

def test_label_dropout_draws_per_image():
    # One row of labels broadcast over the batch: in training, each image keeps or drops it on its own draw.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type='DhariwalUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        out = net.train()(torch.ones([16, 3, 8, 8]), torch.ones([16]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    distinct = torch.unique(out.reshape(16, -1), dim=0)
    assert len(distinct) == 2 # the images with and without the label

def test_attention_runs_in_float32_under_autocast():
    q, k, _ = attention_inputs(torch.float32, scale=3.0)
    qkv = torch.randn([2, 3 * 32, 4, 5], generator=torch.Generator().manual_seed(4)) * 3
    expected = attention_closed_form_heads(qkv, num_heads=1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        w = networks.AttentionOp.apply(q, k)
        a = fast_layers.attention_heads(qkv, num_heads=1)
    assert w.dtype == torch.float32 and a.dtype == torch.float32
    assert rel_err(a, expected) < 1e-5

def assert_reproduces_fixture(net, d):
    """The output, the input gradient and every parameter gradient of `net` match fixture `d`."""
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        assert rel_err(net.eval()(x, sigma, labels, **kwargs), d['out']) < OUT_TOL
    grad_x, grads = fixture_gradients(net, d)
    assert rel_err(grad_x, d['grad_x']) < OUT_TOL
    assert max(rel_err(sampled(g), d[f'grad/{n}']) for n, g in grads.items()) < GRAD_TOL

@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('name', ['net-edm-ddpmpp-cond-aug', 'net-edm-adm-uncond-aug', 'net-ve-ncsnpp-uncond-gray', 'net-vp-songunet-skip-cond'])
def test_fast_paths_reproduce_fixture(name, channels_last):
    # DDPM++ and ADM pool with the [1,1] filter, NCSN++ resamples with [1,3,3,1]; the skip encoder and decoder have aux layers.
    # Channels-last weights keep every activation channels-last, so every group normalisation takes its statistics in place.
    d = load_fixture(name)
    net, _ = build_net(d)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        faithful = net.eval()(x, sigma, labels, **kwargs)
    assert fast_layers.set_fast_paths(net) > 0
    norm_layouts = []
    for module in net.modules():
        if type(module).__name__ == 'GroupNorm':
            module.register_forward_pre_hook(lambda _m, args: norm_layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    assert_reproduces_fixture(net, d)
    assert norm_layouts and (all(norm_layouts) or not channels_last) # every normalisation sees channels-last inputs
    fast_layers.set_fast_paths(net, False) # the faithful forms again, to the bit
    with torch.no_grad():
        assert torch.equal(net.eval()(x, sigma, labels, **kwargs), faithful)

@pytest.mark.parametrize('name', ['net-edm-ddpmpp-cond-aug', 'net-edm-adm-uncond-aug', 'net-ve-ncsnpp-uncond-gray'])
def test_fast_paths_compile_as_one_graph(name):
    # A graph break splits torch.compile's graph (and the sampler's CUDA graph) and runs the rest eagerly.
    d = load_fixture(name)
    net, _ = build_net(d)
    fast_layers.set_fast_paths(net)
    net = net.to(memory_format=torch.channels_last)
    x, sigma, labels, kwargs = net_inputs(d)
    x = x.to(memory_format=torch.channels_last)
    def forward(x, sigma):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return net(x, sigma, labels, **kwargs)
    for training in [True, False]: # with GroupNormNHWC and the autograd forms, then the inference forms
        net.train(training).requires_grad_(training)
        torch._dynamo.reset()
        with torch.set_grad_enabled(training):
            explained = torch._dynamo.explain(forward)(x, sigma)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()

@pytest.mark.parametrize('name', ['net-edm-ddpmpp-cond-aug', 'net-edm-adm-uncond-aug'])
def test_compiled_graph_has_no_scalar_tensor_inputs(name):
    # A 0-dim tensor input is a CPU tensor: inductor then makes no CUDA graph of it (releases before graph
    # partitioning; DDPM++'s skip_scale, np.sqrt(0.5), was one). Python numbers are compiled in as constants.
    net, _ = build_net(load_fixture(name))
    fast_layers.set_fast_paths(net)
    net.eval().requires_grad_(False)
    inputs = []
    def backend(gm, example_inputs):
        inputs.extend(example_inputs)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(net, backend=backend)(torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution]), torch.ones([2]),
                                        torch.eye(net.label_dim)[:2] if net.label_dim else None)
    torch._dynamo.reset()
    assert inputs and not [t.shape for t in inputs if isinstance(t, torch.Tensor) and t.ndim == 0]

@pytest.mark.slow
def test_compiled_fast_network_equals_eager():
    # Inductor's kernels for the fast forms (layouts fixed by as_strided, stored scales and shifts, merged
    # affine views) compute what eager mode computes. Inference only: compiling the training step takes minutes here.
    d = load_fixture('net-edm-ddpmpp-cond-aug')
    net, _ = build_net(d)
    fast_layers.set_fast_paths(net)
    net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x, sigma, labels, kwargs = net_inputs(d)
    x = x.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = net(x, sigma, labels, **kwargs)
        compiled = torch.compile(net)(x, sigma, labels, **kwargs)
    torch._dynamo.reset()
    assert rel_err(compiled, eager) < 1e-5
    assert rel_err(compiled, d['out']) < OUT_TOL

def test_embedding_sums_keep_type_promotion():
    # add_embedding casts explicitly (for the compiler) but gives what emb + term gives.
    for emb_dtype, term_dtype in [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)]:
        emb, term = torch.randn([4, 16], dtype=emb_dtype), torch.randn([4, 16], dtype=term_dtype)
        expected = emb + term
        actual = networks.add_embedding(emb, term)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)

def test_pooled_resampling_equals_depthwise_convolution():
    for up in [False, True]:
        conv = networks.Conv2d(in_channels=8, out_channels=8, kernel=0, up=up, down=not up)
        x = torch.randn([2, 8, 6, 6], dtype=torch.float64)
        expected = conv(x)
        assert fast_layers.set_fast_paths(conv) == 1
        assert torch.allclose(conv(x), expected, rtol=0, atol=1e-15) and conv(x).shape == expected.shape

def test_channels_last_group_norm_gradients_equal_group_norm():
    # The fast GroupNorm's handwritten backward of the in-place statistics against the faithful one, in float64.
    x = torch.randn([3, 32, 5, 7], dtype=torch.float64).to(memory_format=torch.channels_last)
    weight, bias = torch.randn([32], dtype=torch.float64), torch.randn([32], dtype=torch.float64)
    dy = torch.randn([3, 32, 5, 7], dtype=torch.float64)
    for weight_grad in [True, False]:
        grads = []
        for fast in [True, False]:
            norm = networks.GroupNorm(num_channels=32, num_groups=8).to(torch.float64)
            norm.load_state_dict(dict(weight=weight, bias=bias))
            fast_layers.set_fast_paths(norm, fast)
            inputs = [x.detach().requires_grad_(), norm.weight.requires_grad_(weight_grad), norm.bias.requires_grad_(weight_grad)]
            norm(inputs[0]).backward(dy)
            grads.append([t.grad for t in inputs])
        assert torch.allclose(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
        assert grads[0][0].is_contiguous(memory_format=torch.channels_last)
        if weight_grad:
            assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads[0][1:], grads[1][1:]))
        else:
            assert grads[0][1] is None and grads[0][2] is None

def test_fast_convolution_adds_a_term_in_place_of_its_bias():
    for up, down in [(False, False), (True, False), (False, True)]:
        for resample_filter in [[1, 1], [1, 3, 3, 1]]:
            conv = networks.Conv2d(in_channels=4, out_channels=6, kernel=3, up=up, down=down, resample_filter=resample_filter, init_bias=1).to(torch.float64)
            x = torch.randn([2, 4, 6, 6], dtype=torch.float64)
            add = torch.randn([2, 6, 1, 1], dtype=torch.float64)
            term = add + conv.bias.reshape(1, -1, 1, 1)
            assert torch.allclose(fast_layers.conv2d(conv, x, term=term), conv(x) + add, rtol=0, atol=1e-12)
            assert torch.allclose(fast_layers.conv2d(conv, x), conv(x), rtol=0, atol=1e-12)

@pytest.mark.parametrize('name', ['net-edm-ddpmpp-cond-aug', 'net-edm-adm-uncond-aug'])
def test_merged_affine_equals_each_blocks_affine(name):
    # One matrix product for all blocks gives each block's affine(emb), plus conv0's bias where the block folds it.
    net, _ = build_net(load_fixture(name))
    net = net.to(torch.float64)
    blocks = [m for m in net.modules() if type(m).__name__ == 'UNetBlock']
    emb = torch.randn([3, blocks[0].emb_channels], dtype=torch.float64)
    merged = fast_layers.merged_affine(blocks, emb)
    assert len(merged) == len(blocks)
    for block, params in zip(blocks, merged):
        expected = block.affine(emb) + (block.conv0.bias if fast_layers.folds_conv0_bias(block) else 0)
        assert torch.allclose(params, expected, rtol=0, atol=1e-12)

@pytest.mark.parametrize('channels_last', [False, True])
def test_nearest_upsampling_gradient_equals_interpolate(channels_last):
    x = torch.randn([2, 6, 4, 5], dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn([2, 6, 8, 10], dtype=torch.float64)
    a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
    y = fast_layers.upsample_nearest2x(a)
    y_ref = torch.nn.functional.interpolate(b, scale_factor=2, mode='nearest')
    assert torch.equal(y, y_ref) and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12)

#----------------------------------------------------------------------------
# Precision and memory layout.

def test_use_fp16_on_cpu_runs_float32():
    d = load_fixture('net-edm-ddpmpp-cond-aug')
    net16, _ = build_net(d, use_fp16=True)
    net32, _ = build_net(d, use_fp16=False)
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        out16 = net16.eval()(x, sigma, labels, **kwargs)
        out32 = net32.eval()(x, sigma, labels, **kwargs)
    assert out16.dtype == torch.float32
    assert torch.equal(out16, out32)

@pytest.mark.parametrize('name', NET_FIXTURES)
def test_channels_last_reproduces_fixture(name):
    d = load_fixture(name)
    net, _ = build_net(d)
    net = net.eval().to(memory_format=torch.channels_last)
    x, sigma, labels, kwargs = net_inputs(d)
    with torch.no_grad():
        out = net(x.to(memory_format=torch.channels_last), sigma, labels, **kwargs)
    assert rel_err(out, d['out']) < OUT_TOL

@pytest.mark.parametrize('name', ['net-edm-adm-uncond-aug', 'net-ve-ncsnpp-uncond-gray'])
def test_autocast_bfloat16_forward_backward(name):
    d = load_fixture(name)
    net, _ = build_net(d)
    x, sigma, labels, kwargs = net_inputs(d)
    net.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, sigma, labels, **kwargs)
    out.square().mean().backward()
    assert out.dtype == torch.float32 # The network boundary stays float32.
    assert rel_err(out, d['out']) < 0.1 # bfloat16 keeps about 3 significant digits.
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())

#----------------------------------------------------------------------------
# Errors.

def test_unknown_model_type_lists_valid_names():
    with pytest.raises(ValueError, match='SongUNet.*DhariwalUNet'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='NoSuchUNet')

def test_invalid_options_raise_value_error():
    with pytest.raises(ValueError, match='init_mode'):
        networks.weight_init([2, 2], mode='orthogonal', fan_in=2, fan_out=2)
    with pytest.raises(ValueError, match='encoder_type'):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type='unet')
    with pytest.raises(ValueError, match='up and down'):
        networks.Conv2d(4, 4, kernel=3, up=True, down=True)

#----------------------------------------------------------------------------
