"""Time two 32x32 decoder blocks of CIFAR-10 DDPM++ (each takes the previous
output concatenated with a skip: 512 channels) the way the fast sampling mode
runs them (fp16 autocast, channels-last, torch.compile with CUDA graphs), in
variants that compute the same function, and keep inductor's generated code
of each, so that a slow kernel can be read and its alternatives timed in
seconds of compilation rather than minutes.

    python bench/bench_block.py [--batch=256] [--variants=base,welford,split,split-skip,channel-sums,group-stored,cat-stored] [--code-dir=DIR]
    python bench/bench_block.py --device=cpu --batch=2 --eager      # numerics only
    python bench/bench_block.py --backward                          # training: forward + backward, bf16, no CUDA graphs

Variants:
  base        UNetBlock as the network runs it: norm0 and the 1x1 skip
              convolution both read the concatenation (networks.cat_skip,
              as SongUNet's decoder makes it; run E's figures predate this
              and timed a plain torch.cat). On CUDA (run F) inductor still
              wrote the concatenation NCHW.
  welford     base with group_norm_nhwc as run D measured it: Welford
              statistics (torch.var_mean) and the normalisation recomputing
              rsqrt(var + eps), weight and bias for every element; with
              --backward, autograd's backward of it rather than
              GroupNormNHWC's.
  split       norm0 of the concatenation taken as two group norms, one per
              half (the groups do not straddle the halves), concatenated
              after the normalisation.
  split-skip  also the 1x1 skip convolution as the sum of two, one per half,
              so that the concatenation is never formed.
  channel-sums
              base with the group statistics taken as sums per image and
              channel over the pixels first, then per group (inference
              only; under --backward autograd differentiates it). Reduced per
              group directly, each program of inductor's statistics kernel
              reads C/G contiguous values per pixel (16 bytes at 256
              channels), and run E's ran at 1.8 TB/s; reduced per channel,
              a program reads whole rows of contiguous channels.
  group-stored
              base with one scale and shift stored per image and group
              (rstd and -mean * rstd, which the statistics kernel computes
              as it ends) rather than per image and channel, and the
              weight and bias applied per element (inference only; under
              --backward autograd differentiates it). For the whole sampler
              inductor_kernels.py counts 214 Triton kernels per evaluation
              rather than 285 (the small kernels that turn each group's
              statistics into per-channel scales are gone) and about the
              same traffic, at the cost of one more multiply-add and two
              more (cached) loads per element.
  cat-stored  base with the concatenation itself laid out channels-last
              (networks.cat_skip's output through networks._stored, as its
              inputs already are), so that norm0's kernel writes one tensor
              and the skip convolution reads the concatenation in place
              (inference only: under --backward it is base).
"""

import contextlib
import os
import sys
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch_utils.misc import choose_device # pylint: disable=wrong-import-position
from training import networks # pylint: disable=wrong-import-position
from bench import redraw_small_weights, write_profile # pylint: disable=wrong-import-position

VARIANTS = ('base', 'welford', 'split', 'split-skip', 'channel-sums', 'group-stored', 'cat-stored')

#----------------------------------------------------------------------------

def make_blocks(device):
    """Two decoder blocks 512 -> 256 channels with SongUNet's DDPM++ settings, near-zero layers redrawn."""
    kwargs = dict(emb_channels=512, num_heads=1, dropout=0.13, skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=[1, 1],
                  resample_proj=True, adaptive_scale=False, init=dict(init_mode='xavier_uniform'),
                  init_zero=dict(init_mode='xavier_uniform', init_weight=1e-5))
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([networks.UNetBlock(in_channels=512, out_channels=256, **kwargs) for _ in range(2)])
    redraw_small_weights(blocks)
    networks.set_fast_paths(blocks)
    return blocks.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)

def block_split(block, x, skip, emb, split_skip):
    """UNetBlock.forward (adaptive_scale=False, no attention) on cat([x, skip]) without normalising the concatenation."""
    c = x.shape[1]
    norm0 = block.norm0
    groups_x = norm0.num_groups * c // (c + skip.shape[1]) # whole groups: checked by the caller
    h = torch.cat([networks.group_norm_nhwc(x, groups_x, norm0.weight[:c], norm0.bias[:c], norm0.eps),
                   networks.group_norm_nhwc(skip, norm0.num_groups - groups_x, norm0.weight[c:], norm0.bias[c:], norm0.eps)], dim=1)
    y = block.conv0(networks.silu(h))
    params = block.affine(emb).unsqueeze(2).unsqueeze(3).to(y.dtype)
    y = networks.silu(block.norm1(y.add_(params)))
    y = block.conv1(y) # dropout is off in evaluation
    if split_skip:
        w = block.skip.weight.to(y.dtype)
        s = torch.nn.functional.conv2d(x, w[:, :c]) + torch.nn.functional.conv2d(skip, w[:, c:])
        y = y.add_(s.add_(block.skip.bias.to(y.dtype).reshape(1, -1, 1, 1)))
    else:
        y = y.add_(block.skip(networks.cat_skip(x, skip)))
    return y * block.skip_scale

def group_norm_welford(x, num_groups, weight, bias, eps):
    """group_norm_nhwc as run D measured it, in inference and under autograd (with autograd's backward)."""
    N, C, H, W = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(dtype).permute(0, 2, 3, 1).reshape(N, H * W, num_groups, C // num_groups)
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=0, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(N, H, W, C).permute(0, 3, 1, 2)
    y = y * weight.to(dtype).reshape(1, -1, 1, 1) + bias.to(dtype).reshape(1, -1, 1, 1)
    return y if networks._autocast_enabled(x.device.type) else y.to(x.dtype) # pylint: disable=protected-access

def group_norm_channel_sums(x, num_groups, weight, bias, eps):
    """group_norm_nhwc's inference form with the sums over the pixels taken per channel, then per group."""
    N, C, H, W = x.shape
    G = num_groups
    dtype = networks._at_least_float32(x.dtype) # pylint: disable=protected-access
    xc = x.to(dtype).permute(0, 2, 3, 1).reshape(N, H * W, C)
    origin = xc[:, :1, :].reshape(N, 1, G, C // G)[:, :, :, :1].expand(N, 1, G, C // G).reshape(N, 1, C)
    n = H * W * (C // G)
    mean = xc.sum(dim=1).reshape(N, G, -1).sum(dim=2) / n # [N, G]
    m2 = (xc - origin).square().sum(dim=1).reshape(N, G, -1).sum(dim=2) / n
    origin = origin.reshape(N, G, -1)[:, :, 0]
    var = (m2 - (mean - origin).square()).clamp(min=0)
    scale = networks._stored(torch.rsqrt(var + eps).unsqueeze(2) * weight.to(dtype).reshape(G, -1)) # pylint: disable=protected-access
    shift = networks._stored(bias.to(dtype).reshape(G, -1) - mean.unsqueeze(2) * scale) # pylint: disable=protected-access
    y = xc * scale.reshape(N, 1, C) + shift.reshape(N, 1, C)
    y = y.reshape(N, H, W, C).permute(0, 3, 1, 2)
    return y if networks._autocast_enabled(x.device.type) else y.to(x.dtype) # pylint: disable=protected-access

def group_norm_group_stored(x, num_groups, weight, bias, eps):
    """group_norm_nhwc's inference form with the scale and shift stored per group, the affine per element."""
    G = num_groups
    dtype = networks._at_least_float32(x.dtype) # pylint: disable=protected-access
    _, mean, rstd = networks._normalize(x, G, weight, bias, eps) # pylint: disable=protected-access # compiled, its y is dropped
    scale = networks._stored(rstd) # pylint: disable=protected-access
    shift = networks._stored(-mean * rstd) # pylint: disable=protected-access
    y = (networks._groups(x.to(dtype), G) * scale + shift) * weight.to(dtype).reshape(G, -1) + bias.to(dtype).reshape(G, -1) # pylint: disable=protected-access
    y = networks._ungroup(y, x.shape) # pylint: disable=protected-access
    return y if networks._autocast_enabled(x.device.type) else y.to(x.dtype) # pylint: disable=protected-access

NORMS = {'welford': group_norm_welford, 'channel-sums': group_norm_channel_sums, 'group-stored': group_norm_group_stored}

_cat_skip = networks.cat_skip

def cat_skip_stored(x, skip):
    """networks.cat_skip with its output laid out as in eager mode (channels-last) when compiled for inference."""
    return networks._keep_layout(_cat_skip(x, skip)) # pylint: disable=protected-access

CATS = {'cat-stored': cat_skip_stored}

@contextlib.contextmanager
def forms_of(variant):
    """The network's group_norm_nhwc and cat_skip, or the variant's forms of them (while it compiles and runs)."""
    current = networks.group_norm_nhwc, networks.cat_skip
    networks.group_norm_nhwc = NORMS.get(variant, current[0])
    networks.cat_skip = CATS.get(variant, current[1])
    try:
        yield
    finally:
        networks.group_norm_nhwc, networks.cat_skip = current

def make_fn(blocks, variant):
    def fn(x, skip1, skip2, emb):
        for block, skip in zip(blocks, (skip1, skip2)):
            if variant in ('base', 'welford', 'channel-sums', 'group-stored', 'cat-stored'):
                x = block(networks.cat_skip(x, skip), emb)
            else:
                x = block_split(block, x, skip, emb, split_skip=(variant == 'split-skip'))
        return x
    return fn

#----------------------------------------------------------------------------

@click.command()
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--variants', help='Comma-separated: ' + ','.join(VARIANTS), metavar='LIST', type=str, default=','.join(VARIANTS), show_default=True)
@click.option('--device', help='Device (default: CUDA when available)', metavar='STR', type=str, default=None)
@click.option('--iters', help='Timed repetitions', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--eager', help='Do not compile (numerics only)', is_flag=True)
@click.option('--code-dir', help='Write the generated code and the table of kernels of each variant here', metavar='DIR', type=str, default=None)
@click.option('--backward', help='Time forward + backward as the fast training step runs it (bf16, compiled without CUDA graphs)', is_flag=True)
def main(batch, variants, device, iters, eager, code_dir, backward):
    """Time the decoder-block variants and check that they compute the same function."""
    variants = variants.split(',')
    for variant in variants:
        if variant not in VARIANTS:
            raise click.ClickException(f'--variants: unknown variant {variant!r} (valid: {", ".join(VARIANTS)})')
    device = choose_device(device)
    is_cuda = device.type == 'cuda'
    torch.backends.cudnn.allow_tf32 = False # the float32 comparison of the variants; the timed runs are fp16
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if code_dir:
        import torch._inductor.config as inductor_config # pylint: disable=import-outside-toplevel
        inductor_config.fx_graph_cache = False # generate the code, to keep it
    dtype = torch.float16 if is_cuda and not backward else torch.bfloat16 # as bench.py's fast modes
    blocks = make_blocks(device)
    if backward:
        blocks.requires_grad_(True) # evaluation mode still: dropout off, so that the variants compare
    assert blocks[0].norm0.num_groups * 256 % 512 == 0 # the halves hold whole groups

    gen = torch.Generator(device).manual_seed(1)
    inputs = [torch.randn([batch, 256, 32, 32], device=device, generator=gen).to(memory_format=torch.channels_last) for _ in range(3)]
    emb = torch.randn([batch, 512], device=device, generator=gen)
    with torch.no_grad():
        expected = make_fn(blocks, 'base')(*inputs, emb).float() # float32, no autocast: the faithful values
    half_inputs = [x.to(dtype).requires_grad_(backward) for x in inputs]
    if code_dir:
        os.makedirs(code_dir, exist_ok=True)
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    print(f'device {torch.cuda.get_device_name(device) if is_cuda else "cpu"}, torch {torch.__version__}, batch {batch}, {dtype}'
          + (', forward + backward' if backward else ''), flush=True)

    for variant in variants:
        with forms_of(variant):
            run_variant(blocks, variant, inputs, emb, expected, half_inputs, dtype, device, eager, iters, code_dir, sync, backward)

def run_variant(blocks, variant, inputs, emb, expected, half_inputs, dtype, device, eager, iters, code_dir, sync, backward):
    """Check one variant against the float32 base, then compile, time and (with code_dir) keep its code and kernels."""
    is_cuda = device.type == 'cuda'
    graphs = is_cuda and not backward # sampling replays CUDA graphs; the training step does not
    with torch.no_grad(): # the same function: float32 outputs within rounding of the base variant's
        exact_err = (make_fn(blocks, variant)(*inputs, emb).float() - expected).abs().max().item() / expected.abs().max().item()
    if exact_err > 1e-4:
        raise click.ClickException(f'variant {variant} differs from base in float32 by {exact_err:.1e} of the largest output')
    fn = make_fn(blocks, variant)
    if not eager:
        fn = torch.compile(fn, mode=('reduce-overhead' if graphs else None))
    def run():
        if not backward:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                return fn(*half_inputs, emb)
        for t in [*blocks.parameters(), *half_inputs]:
            t.grad = None
        with torch.autocast(device.type, dtype=dtype):
            out = fn(*half_inputs, emb)
        out.float().square().mean().backward()
        return out.detach()
    t0 = time.perf_counter()
    if code_dir and not eager:
        from torch._inductor.utils import run_and_get_code # pylint: disable=import-outside-toplevel
        out, codes = run_and_get_code(run)
        with open(os.path.join(code_dir, f'block-{variant}.py'), 'w') as f:
            f.write('\n\n'.join(codes))
    else:
        out = run()
    out = out.float().clone()
    for _ in range(2): # CUDA graphs record on the second and later calls; the backward compiles on the first
        run()
    sync()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    ms = (time.perf_counter() - t0) / iters * 1000
    err = (out - expected).abs().max().item() / expected.abs().max().item()
    print(f'{variant:12s} {ms:8.3f} ms per call  error vs float32 base {err:.1e}, in float32 {exact_err:.1e} (of the largest output)  warm-up {warmup:.0f} s', flush=True)
    if code_dir:
        write_profile(run, sync, device, os.path.join(code_dir, f'kernels-{variant}.txt'))


#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
