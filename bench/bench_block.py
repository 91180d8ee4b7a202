"""Time two 32x32 decoder blocks of CIFAR-10 DDPM++ (each takes the previous
output concatenated with a skip: 512 channels) the way the fast sampling mode
runs them (fast paths, fp16 autocast, channels-last, torch.compile with CUDA
graphs), check them against the faithful blocks in float32, and keep
inductor's generated code and table of kernels, so that a slow kernel can be
read and a change to the fast forms timed in seconds of compilation rather
than minutes.

    python bench/bench_block.py [--batch=256] [--code-dir=DIR]
    python bench/bench_block.py --device=cpu --batch=2 --eager      # numerics only
    python bench/bench_block.py --backward                          # training: forward + backward, bf16, no CUDA graphs
"""

import os
import sys
import time

import click
import numpy as np
import torch

from common import ROOT, redraw_small_weights, write_profile
sys.path.insert(0, ROOT)
from torch_utils.misc import choose_device # pylint: disable=wrong-import-position
from training import fast_layers, networks # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def make_blocks(device):
    """Two decoder blocks 512 -> 256 channels with SongUNet's DDPM++ settings, near-zero layers redrawn."""
    kwargs = dict(emb_channels=512, num_heads=1, dropout=0.13, skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=[1, 1],
                  resample_proj=True, adaptive_scale=False, init=dict(init_mode='xavier_uniform'),
                  init_zero=dict(init_mode='xavier_uniform', init_weight=1e-5))
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([networks.UNetBlock(in_channels=512, out_channels=256, **kwargs) for _ in range(2)])
    redraw_small_weights(blocks)
    return blocks.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)

def make_fn(blocks, fast):
    """The two blocks on the concatenations of their inputs, as SongUNet's decoder runs them: with the
    fast paths (training/fast_layers.py) or, with fast=False, the faithful forms."""
    fast_layers.set_fast_paths(blocks, fast)
    cat = fast_layers.cat_skip if fast else (lambda x, skip: torch.cat([x, skip], dim=1))
    def fn(x, skip1, skip2, emb):
        for block, skip in zip(blocks, (skip1, skip2)):
            x = block(cat(x, skip), emb)
        return x
    return fn

#----------------------------------------------------------------------------

@click.command()
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--device', help='Device (default: CUDA when available)', metavar='STR', type=str, default=None)
@click.option('--iters', help='Timed repetitions', metavar='INT', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--eager', help='Do not compile (numerics only)', is_flag=True)
@click.option('--code-dir', help='Write the generated code and the table of kernels here', metavar='DIR', type=str, default=None)
@click.option('--backward', help='Time forward + backward as the fast training step runs it (bf16, compiled without CUDA graphs)', is_flag=True)
def main(batch, device, iters, eager, code_dir, backward):
    """Time the fast decoder blocks and check them against the faithful ones."""
    device = choose_device(device)
    is_cuda = device.type == 'cuda'
    torch.backends.cudnn.allow_tf32 = False # the float32 comparison; the timed runs are fp16 or bf16
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if code_dir:
        import torch._inductor.config as inductor_config # pylint: disable=import-outside-toplevel
        inductor_config.fx_graph_cache = False # generate the code, to keep it
        os.makedirs(code_dir, exist_ok=True)
    dtype = torch.float16 if is_cuda and not backward else torch.bfloat16 # as bench.py's fast modes
    blocks = make_blocks(device).requires_grad_(backward) # evaluation mode still: dropout off, so that the forms compare
    gen = torch.Generator(device).manual_seed(1)
    inputs = [torch.randn([batch, 256, 32, 32], device=device, generator=gen).to(memory_format=torch.channels_last) for _ in range(3)]
    emb = torch.randn([batch, 512], device=device, generator=gen)
    with torch.no_grad():
        expected = make_fn(blocks, fast=False)(*inputs, emb) # float32, no autocast: the faithful values
        exact_err = rel_err(make_fn(blocks, fast=True)(*inputs, emb), expected)
    if exact_err > 1e-4:
        raise click.ClickException(f'the fast blocks differ from the faithful ones in float32 by {exact_err:.1e} of the largest output')
    half_inputs = [x.to(dtype).requires_grad_(backward) for x in inputs]
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    print(f'device {torch.cuda.get_device_name(device) if is_cuda else "cpu"}, torch {torch.__version__}, batch {batch}, {dtype}'
          + (', forward + backward' if backward else ''), flush=True)

    fn = make_fn(blocks, fast=True)
    if not eager:
        fn = torch.compile(fn, mode=('reduce-overhead' if is_cuda and not backward else None)) # sampling replays CUDA graphs
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
        with open(os.path.join(code_dir, 'blocks.py'), 'w') as f:
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
    print(f'{ms:8.3f} ms per call  error vs float32 faithful {rel_err(out, expected):.1e}, in float32 {exact_err:.1e} '
          f'(of the largest output)  warm-up {warmup:.0f} s', flush=True)
    if code_dir:
        write_profile(run, sync, device, os.path.join(code_dir, 'kernels.txt'))

def rel_err(actual, expected):
    """Largest absolute difference, relative to the largest absolute expected value."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
