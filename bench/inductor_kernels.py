"""List the Triton kernels that torch.compile generates for a network, on a
machine without a GPU: loads, stores, divisions and special functions per
kernel, the transposing (2-D tiled) kernels that mean a layout change, and per
graph the kernel launches and the bytes of activation-sized buffers they
read or write.

Inductor writes Triton source before it compiles it. With its Triton CPU
backend selected, the source is generated as for a GPU; compiling it then
fails (the `triton` wheel has no CPU driver), but the source is kept. With
oneDNN off while compiling, inductor also takes the same layout decisions as
on CUDA. The `triton` package is needed, but not in the environment that
runs the project:

    pip install --no-deps --target /tmp/tritonlib triton
    PYTHONPATH=/tmp/tritonlib python bench/inductor_kernels.py [--what=sample|train] [--batch=4] [--show=tiled] [--no-freeze]

With --what=train the backward graph is lowered with the forward one, and
no kernel is compiled at all.

The figures are of the CIFAR-10 DDPM++ network with the fast paths
(channels-last, bf16 autocast), as `generate.py --compile` (on CUDA, with
the weights frozen into constants; --no-freeze without) and
`train.py --compile=1` run it. Inductor's internals change between PyTorch
releases; this script follows 2.13.
"""

import ast
import collections
import os
import re
import sys

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import CONFIGS # pylint: disable=wrong-import-position
import dnnlib # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def capture_triton_kernels():
    """Select inductor's Triton CPU backend and return the list that every generated kernel's source is appended to."""
    import torch._inductor.config as inductor_config # pylint: disable=import-outside-toplevel
    import torch._inductor.codegen.triton as triton_codegen # pylint: disable=import-outside-toplevel
    import torch.utils._triton as torch_triton # pylint: disable=import-outside-toplevel
    inductor_config.cpu_backend = 'triton'
    inductor_config.fx_graph_cache = False
    no_driver_hash = lambda: '0' * 64 # the real one asks the (absent) driver
    torch_triton.triton_hash_with_backend = no_driver_hash
    triton_codegen.triton_hash_with_backend = no_driver_hash
    sources = []
    codegen_kernel = triton_codegen.TritonKernel.codegen_kernel
    def keep(self, *args, **kwargs):
        src = codegen_kernel(self, *args, **kwargs)
        sources.append(src)
        return src
    triton_codegen.TritonKernel.codegen_kernel = keep
    as_on_cuda()
    return sources

def as_on_cuda():
    """Take inductor's CUDA heuristics rather than its CPU ones: CPU buffers reused by several kernels are
    stored once more eagerly (always when they involve exp or sigmoid, and at other operation and read
    counts), and CPU kernels are never fused by reordering their loops."""
    import torch._inductor.ir as ir # pylint: disable=import-outside-toplevel
    import torch._inductor.scheduler as scheduler # pylint: disable=import-outside-toplevel
    ir.is_cpu = lambda node: False # only these heuristics ask it
    scheduler.BaseSchedulerNode.is_cpu = lambda self: False

def lower_backward_too():
    """Lower the backward graph together with the forward one, and never compile kernels (the forward
    graph would otherwise fail to load before the backward is lowered)."""
    import torch._functorch.config as functorch_config # pylint: disable=import-outside-toplevel
    import torch._inductor.async_compile as async_compile # pylint: disable=import-outside-toplevel
    functorch_config.force_non_lazy_backward_lowering = True
    class NotCompiled:
        def __getattr__(self, name):
            raise RuntimeError('kernel not compiled')
    async_compile.AsyncCompile.triton = lambda self, kernel_name, source_code, device_str='cuda': NotCompiled()

def describe(src):
    """(kind, element count, tiled, loads, stores, divisions, special functions) of one kernel's source."""
    body = src.split('@triton.jit')[1]
    kind = src.split('@triton_heuristics.')[1].split('(')[0]
    numel = dict(re.findall(r'\b(\w*numel) = (\d+)', body))
    count = 1
    for key in ('xnumel', 'ynumel', 'r0_numel'):
        count *= int(numel.get(key, 1))
    return (kind, count, 'ynumel' in numel, body.count('tl.load('), body.count('tl.store('),
            len(re.findall(r' / ', body)), len(re.findall(r'libdevice\.\w+', body)))

BYTES = dict(float64=8, float32=4, bfloat16=2, float16=2, int64=8, int32=4, bool=1, int8=1, uint8=1)

def accesses(src):
    """{pointer: most elements one launch of this kernel reads or writes through it}: the kernel's element
    count times its loads or stores through that pointer. A kernel that reads a few values of a buffer (one
    per group, say) is then not counted as reading all of it."""
    body = src.split('@triton.jit')[-1]
    count = describe(src)[1]
    pointers = re.findall(r'(\w+_ptr\d+)', body.split('):')[0])
    return {ptr: count * len(re.findall(r'tl\.(?:load|store)\(' + ptr + r'\b', body)) for ptr in pointers}

def launch_traffic(code, min_elements):
    """(Triton launches, other launches, bytes) of one graph's wrapper code: the bytes of the
    activation-sized buffers (at least min_elements) that each Triton launch reads or writes, each once
    (twice for a buffer both read and written), and at most as many elements as the launch accesses.
    Graph inputs and the outputs of extern kernels (whose dtypes the wrapper does not state) count 2
    bytes per element."""
    kernels = re.findall(r"(\w+) = async_compile\.triton\('\w+', '''(.*?)'''", code, re.S)
    limits = {name: accesses(src) for name, src in kernels}
    buffers = {} # name -> (elements, bytes per element)
    triton = other = total = 0
    for line in code.splitlines():
        line = line.strip()
        if line.startswith('#'):
            continue
        if m := re.match(r'(\w+) = empty_strided_\w+\((\([^)]*\)), \([^)]*\), torch\.(\w+)', line):
            buffers[m[1]] = (int(np.prod(ast.literal_eval(m[2]))), BYTES.get(m[3], 2))
        elif m := re.match(r'assert_size_stride\((\w+), (\([^)]*\)), ', line): # an input or an extern kernel's output
            buffers.setdefault(m[1], (int(np.prod(ast.literal_eval(m[2]))), 2))
        elif m := re.match(r'(\w+) = reinterpret_tensor\((\w+), (\([^)]*\))', line):
            buffers[m[1]] = (int(np.prod(ast.literal_eval(m[3]))), buffers.get(m[2], (0, 2))[1])
        elif m := re.match(r'(\w+) = (\w+); del \w+  # reuse', line):
            buffers[m[1]] = buffers.get(m[2], (0, 2))
        elif m := re.match(r'(triton_\w+)\.run\((.*)\)$', line):
            triton += 1
            for (param, limit), arg in zip(limits.get(m[1], {}).items(), m[2].split(', ')):
                elements, size = buffers.get(arg, (0, 0))
                if elements >= min_elements:
                    total += min(elements, limit) * size * (2 if param.startswith('in_out') else 1)
        elif 'extern_kernels.' in line or re.search(r'= torch\.ops\.aten\.\w+\.\w+\(', line):
            other += 1
    return triton, other, total

#----------------------------------------------------------------------------

@click.command()
@click.option('--what', help='Inference (sampling) or training (forward and backward)', type=click.Choice(['sample', 'train']), default='sample', show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--show', help='Print the source of these kernels', type=click.Choice(['none', 'tiled', 'all']), default='none', show_default=True)
@click.option('--freeze/--no-freeze', help='Sampling: the weights as constants, as generate.py --compile on CUDA', default=True, show_default=True)
def main(what, batch, show, freeze):
    """Summarise inductor's Triton kernels for CIFAR-10 DDPM++ without a GPU."""
    try:
        import triton # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        raise click.ClickException('needs the triton package: pip install --no-deps --target DIR triton, then PYTHONPATH=DIR') from None
    from training import fast_layers # pylint: disable=import-outside-toplevel
    from torch._inductor.utils import run_and_get_code # pylint: disable=import-outside-toplevel
    sources = capture_triton_kernels()
    if what == 'train':
        lower_backward_too()
    torch.backends.mkldnn.enabled = False # inductor's layout decisions as on CUDA
    cfg = CONFIGS['cifar10-ddpmpp']
    net = dnnlib.util.construct_class_by_name(**cfg['net'], img_resolution=cfg['res'], img_channels=cfg['ch'], label_dim=cfg['label_dim'])
    fast_layers.set_fast_paths(net)
    net = net.train(what == 'train').requires_grad_(what == 'train').to(memory_format=torch.channels_last)
    x = torch.randn([batch, cfg['ch'], cfg['res'], cfg['res']])
    sigma = torch.ones([batch])
    labels = torch.eye(cfg['label_dim'])[torch.arange(batch) % cfg['label_dim']]
    compiled = torch.compile(net)
    import torch._inductor.config as inductor_config # pylint: disable=import-outside-toplevel
    def run():
        try:
            with torch.autocast('cpu', dtype=torch.bfloat16), torch.set_grad_enabled(what == 'train'), \
                    inductor_config.patch(freezing=(freeze and what == 'sample')):
                compiled(x, sigma, labels, augment_labels=(torch.zeros([batch, 9]) if what == 'train' else None))
        except Exception: # pylint: disable=broad-except
            pass # compiling the kernels fails without a driver; their source is out by then
    _, codes = run_and_get_code(run) # the wrapper code of each graph: forward, then backward
    if not sources:
        raise click.ClickException('no Triton kernel was generated: this PyTorch release is not the one this script follows')

    rows = [describe(src) for src in sources]
    activation = batch * 256 * 16 * 16 # the smallest activation of a 16x16 block
    print(f'{len(rows)} kernels, {sum(r[2] for r in rows)} transposing (2-D tiled); '
          f'over activations of at least {activation} elements:')
    print(f'{"count":>5}  {"kind":10s} {"elements":>9} {"tiled":>5} {"loads":>5} {"stores":>6} {"div":>3} {"special":>7}')
    table = collections.Counter(r for r in rows if r[1] >= activation)
    for (kind, count, tiled, loads, stores, divs, special), n in sorted(table.items(), key=lambda item: -item[0][1] * item[1]):
        print(f'{n:5d}  {kind:10s} {count:9d} {str(tiled):>5} {loads:5d} {stores:6d} {divs:3d} {special:7d}')
    names = ['inference'] if what == 'sample' else ['forward', 'backward']
    for name, code in zip(names, codes):
        triton_launches, other_launches, total = launch_traffic(code, min_elements=batch * 256 * 8 * 8) # the smallest activation
        print(f'{name} graph: {triton_launches} Triton launches, {other_launches} others; '
              f'activation-sized buffers read or written: {total / 1e6:.1f} MB')
    for src, row in zip(sources, rows):
        if show == 'all' or (show == 'tiled' and row[2]):
            print('\n' + src.split('@triton.jit')[1].strip())

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
