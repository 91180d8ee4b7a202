"""Speed benchmark: sampling images/s at 35 NFE, training s/kimg, peak GPU
memory, GFLOP per image and model FLOP utilisation (MFU), for the CIFAR-10
DDPM++ and ImageNet-64 ADM configurations with random weights.

    python bench/bench.py                                  # this checkout, every mode
    python bench/bench.py --ref=/path/to/edm               # also the reference release, with ratios
    python bench/bench.py --quick --device=cpu             # small configurations, smoke test

Each measurement runs in its own subprocess (`--worker`), so a checkout
given with `--ref` is imported in isolation with its own `training` package.
Modes, for this checkout: fp32 (the faithful default), tf32, fp16 and bf16
(`--precision` of generate.py / train.py; sampling fp16 is autocast, training
fp16 the network's use_fp16 path as `train.py --fp16=1`) and `fast` (sampling:
`--precision=fp16 --compile` with CUDA graphs on CUDA, bf16 elsewhere; training:
`--precision=bf16 --compile=1`). A `--ref` checkout runs fp32, tf32, fp16
(use_fp16) and bf16 (autocast) as the reference's scripts would.

The weights are random, with the layers that start near zero redrawn at unit
gain so that the network shapes the images: the PSNR of each mode's images
against this checkout's fp32 images then measures precision loss.
"""

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))) # bench/, when imported from elsewhere
from common import CONFIGS, ROOT, redraw_small_weights, write_profile # pylint: disable=wrong-import-position

MODES = ['fp32', 'tf32', 'fp16', 'bf16', 'fast']
SLOW_OPS = ['paths', 'freeze'] # for --slow-ops

#----------------------------------------------------------------------------
# Worker: one measurement, in a fresh process, printed as one JSON line.
#
# Each checkout runs the way its own scripts run it. This checkout samples
# through training/generation.py (--precision, --compile) and trains with
# training_loop's TrainingStep. Another checkout (--ref) samples as the
# reference's generate.py does (PyTorch's default TF32 settings, its own attention) and
# trains as its training loop does (TF32 off); its fp16 mode is the network's
# use_fp16 path and its bf16 mode plain autocast.

def _set_inductor_options(text):
    """Apply 'key=value,...' to torch._inductor.config (values: int, float, true/false or text)."""
    import torch._inductor.config as config # pylint: disable=import-outside-toplevel
    for item in filter(None, text.split(',')):
        key, value = item.split('=', 1)
        for parse in (int, float, {'true': True, 'false': False}.__getitem__, str):
            try:
                value = parse(value.lower() if parse is not str else value)
                break
            except (ValueError, KeyError):
                continue
        setattr(config, key, value)

def _worker(root, config_name, mode, device_name, what, steps, iters, batch=None, inductor='', slow_ops='', train_graphs=False, save_images=None, profile=None):
    sys.path.insert(0, root)
    import torch
    import dnnlib

    cfg = CONFIGS[config_name]
    device = torch.device(device_name)
    is_cuda = device.type == 'cuda'
    ours = os.path.abspath(root) == ROOT
    if mode == 'fast' and not ours:
        return dict(skipped='fast mode exists only in this checkout')
    if inductor:
        _set_inductor_options(inductor)
    slow = [op for op in slow_ops.split(',') if op]
    freeze = 'freeze' not in slow # compiled sampling; training never freezes its weights
    fast_paths = 'paths' not in slow # training.fast_layers.set_fast_paths
    torch.manual_seed(0)

    net_kwargs = dict(cfg['net'], img_resolution=cfg['res'], img_channels=cfg['ch'], label_dim=cfg['label_dim'])
    if mode == 'fp16' and (what == 'train' or not ours):
        net_kwargs['use_fp16'] = True # the reference's fp16 path (train.py --fp16=1)
    net = dnnlib.util.construct_class_by_name(**net_kwargs)
    redraw_small_weights(net)
    net = net.to(device)
    num_params = sum(p.numel() for p in net.parameters())

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    def time_calls(call, warmup_calls):
        """Seconds per call over `iters` calls, after `warmup_calls` (timed as result['warmup_sec'])."""
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        outputs = [call() for _ in range(warmup_calls)]
        sync()
        result['warmup_sec'] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        sync()
        seconds = (time.perf_counter() - t0) / iters
        if profile:
            write_profile(call, sync, device, profile)
        return seconds, outputs[-1]

    # FLOPs of one forward pass per image (matmuls and convolutions, 2 per multiply-add).
    gflop = None
    try:
        from torch.utils.flop_counter import FlopCounterMode
        x1 = torch.randn([1, cfg['ch'], cfg['res'], cfg['res']], device=device)
        labels1 = torch.zeros([1, cfg['label_dim']], device=device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.eval()(x1, torch.ones([1], device=device), labels1)
        gflop = counter.get_total_flops() / 1e9
    except Exception: # pylint: disable=broad-except
        pass

    result = dict(config=config_name, mode=mode, params=num_params, gflop=gflop, device=str(device),
                  device_name=torch.cuda.get_device_name(device) if is_cuda else 'cpu', torch=torch.__version__)

    if what == 'sample':
        net.eval().requires_grad_(False)
        batch = batch or cfg['sample_batch']
        if ours:
            sample = _our_sampling(net, device, mode, batch, steps, freeze, fast_paths)
        else:
            sample = _reference_sampling(root, net, device, mode, batch, steps, cfg)
        seconds, images = time_calls(sample, warmup_calls=1) # warm-up (and compilation)
        if save_images:
            import numpy as np
            np.save(save_images, images)
        nfe = 2 * steps - 1
        result.update(batch=batch, nfe=nfe, images_per_sec=batch / seconds,
                      achieved_tflops=(gflop * nfe * batch / seconds / 1e3) if gflop else None)

    if what == 'train':
        torch.backends.cudnn.benchmark = True # both training loops default to cudnn_benchmark=True
        torch.backends.cudnn.allow_tf32 = (mode == 'tf32') # both training loops turn TF32 off by default
        torch.backends.cuda.matmul.allow_tf32 = (mode == 'tf32')
        batch = batch or cfg['train_batch']
        images = torch.randn([batch, cfg['ch'], cfg['res'], cfg['res']], device=device)
        labels = torch.eye(cfg['label_dim'], device=device)[torch.randint(cfg['label_dim'], [batch], device=device)]
        if ours:
            train_step = _our_training_step(net, device, mode, batch, fast_paths, train_graphs, use_fp16=net_kwargs.get('use_fp16', False))
        else:
            train_step = _reference_training_step(net, batch, autocast_dtype=(torch.bfloat16 if mode == 'bf16' else None))
        nimg = [0]
        def step():
            if train_graphs and hasattr(torch.compiler, 'cudagraph_mark_step_begin'):
                torch.compiler.cudagraph_mark_step_begin() # the previous step's graph outputs are free to reuse
            train_step(lambda: (images, labels), nimg[0])
            nimg[0] += batch
        seconds, _ = time_calls(step, warmup_calls=2) # warm-up (and compilation)
        result.update(batch=batch, sec_per_kimg=seconds / batch * 1000,
                      achieved_tflops=(3 * gflop * batch / seconds / 1e3) if gflop else None)

    if is_cuda:
        result['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
    return result

#----------------------------------------------------------------------------
# The code paths each checkout's scripts run: ours through training/generation.py
# and training.training_loop.TrainingStep; the reference release's through its
# generate.py (where its sampler lives) and the body of its training loop.

def _our_sampling(net, device, mode, batch, steps, freeze, fast_paths):
    """A call that samples seeds 0..batch-1 as generate.py does; returns uint8 images [N, H, W, C]."""
    from training.generation import prepare_network, sample_batches
    # fast: fp16 on CUDA (bf16's speed with 3 more mantissa bits), bf16 elsewhere (CPUs emulate fp16).
    precision = {'fast': 'fp16' if device.type == 'cuda' else 'bf16'}.get(mode, mode)
    sampler_net = prepare_network(net, device, precision=precision, use_compile=(mode == 'fast'), freeze=freeze)
    if not fast_paths: # before the first call, which compiles
        from training import fast_layers
        fast_layers.set_fast_paths(sampler_net.net, False) # a compiled wrapper holds the modules too
    seeds = list(range(batch))
    def sample():
        ((_seeds, images),) = sample_batches(sampler_net, seeds, device, max_batch_size=batch, num_steps=steps)
        return images
    return sample

def _reference_sampling(root, net, device, mode, batch, steps, cfg):
    """The same for the reference release, as its generate.py samples (its sampler is defined there)."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location('reference_generate', os.path.join(root, 'generate.py'))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    if mode == 'tf32':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if mode == 'bf16' else None
    class RefSamplerNet: # the sampler sees the usual attributes; the call runs under autocast
        def __getattr__(self, name):
            return getattr(net, name)
        def __call__(self, *args, **kwargs):
            with torch.autocast(device.type, dtype=dtype, enabled=(dtype is not None)):
                return net(*args, **kwargs)
    def sample():
        rnd = reference.StackedRandomGenerator(device, list(range(batch)))
        latents = rnd.randn([batch, cfg['ch'], cfg['res'], cfg['res']], device=device)
        labels = torch.eye(cfg['label_dim'], device=device)[rnd.randint(cfg['label_dim'], size=[batch], device=device)]
        with torch.no_grad():
            images = reference.edm_sampler(RefSamplerNet(), latents, labels, randn_like=rnd.randn_like, num_steps=steps)
        return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return sample

def _our_training_step(net, device, mode, batch, fast_paths, train_graphs, use_fp16):
    """training_loop's TrainingStep for `net` as train.py sets it up in `mode` (bf16 and fast: --precision=bf16
    [--compile=1]; fp16: --fp16=1 with the dynamic loss scale)."""
    import torch
    from training.loss import EDMLoss
    from training.training_loop import TrainingStep, fused_adam_kwargs
    fast = mode in ('bf16', 'fast')
    net.train().requires_grad_(True)
    if fast:
        from training import fast_layers
        fast_layers.set_fast_paths(net, fast_paths)
    if mode == 'fast':
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_net = torch.compile(net, mode=('reduce-overhead' if train_graphs else None)) if mode == 'fast' else net
    opt_kwargs = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    if fast:
        opt_kwargs.update(fused_adam_kwargs(dict(class_name='torch.optim.Adam'), device))
    optimizer = torch.optim.Adam(net.parameters(), **opt_kwargs)
    loss_scale = None
    if use_fp16:
        from training.loss_scale import DynamicLossScale
        loss_scale = DynamicLossScale(1, device=device)
    return TrainingStep(net=net, ema=ema, loss_fn=EDMLoss(), optimizer=optimizer, batch_size=batch, lr=1e-4,
                        train_net=train_net, loss_scale=loss_scale, precision=('bf16' if fast else 'fp32'), fast=fast)

def _reference_training_step(net, batch, autocast_dtype=None):
    """One step of the reference release's training loop (gradients, Adam, EMA); bf16 mode: under autocast."""
    import torch
    from training.loss import EDMLoss
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    ema_beta = 0.999
    def step(next_batch, _cur_nimg):
        optimizer.zero_grad(set_to_none=True)
        images, labels = next_batch()
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=(autocast_dtype is not None)):
            loss = loss_fn(net=net, images=images, labels=labels)
        loss.sum().mul(1 / batch).backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
    return step

#----------------------------------------------------------------------------

def _run_worker(root, config, mode, device, what, opts, timeout, save_images=None, profile_dir=None):
    """One measurement in a subprocess; `opts` holds the worker's settings (steps, iters, batch, inductor, slow_ops, train_graphs)."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'--root={root}', f'--configs={config}',
           f'--modes={mode}', f'--device={device}', f'--what={what}', f'--worker-opts={json.dumps(opts)}']
    if save_images:
        cmd.append(f'--save-images={save_images}')
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        label = 'ours' if os.path.abspath(root) == ROOT else 'ref'
        cmd.append(f'--profile={os.path.join(os.path.abspath(profile_dir), f"profile-{config}-{what}-{mode}-{label}.txt")}')
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return dict(error=f'timeout after {timeout} s')
    lines = [line for line in res.stdout.splitlines() if line.startswith('{')]
    if res.returncode != 0 or not lines:
        stderr = res.stderr.strip().splitlines()
        return dict(error=(stderr or ['failed'])[-1], log='\n'.join(stderr[-20:]))
    return json.loads(lines[-1])

def _fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else '-'

#----------------------------------------------------------------------------

@click.command()
@click.option('--ref', 'ref_root', help='Another checkout with the EDM layout to compare against', metavar='PATH', type=str, default=None)
@click.option('--configs', help='Comma-separated configurations', metavar='LIST', type=str, default=None)
@click.option('--modes', help='Comma-separated modes: ' + ','.join(MODES), metavar='LIST', type=str, default=','.join(MODES), show_default=True)
@click.option('--what', help='sample, train or both', type=click.Choice(['sample', 'train', 'both']), default='both', show_default=True)
@click.option('--device', help='Device (default: CUDA when available)', metavar='STR', type=str, default=None)
@click.option('--steps', help='Sampler steps (NFE = 2*steps-1)', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--iters', help='Timed repetitions', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--peak-tflops', help='Peak dense TFLOP/s of the device, for MFU (H100/H200 bf16: 989)', metavar='FLOAT', type=float, default=989.0, show_default=True)
@click.option('--quick', help='Small configurations, fp32 and bf16, one iteration (CPU smoke test)', is_flag=True)
@click.option('--timeout', help='Seconds per measurement', metavar='INT', type=int, default=1800, show_default=True)
@click.option('--batch', help='Batch size (default: the configuration\'s)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--inductor', help='torch._inductor.config settings for the fast mode, e.g. conv_1x1_as_mm=true', metavar='LIST', type=str, default='')
@click.option('--slow-ops', help='Fast operations to leave off in our modes, for A/B measurements: paths (the fast layer forms of set_fast_paths), freeze (compiled sampling with the weights as inputs, not constants)', metavar='LIST', type=str, default='')
@click.option('--train-graphs', help='Replay the compiled network of the fast training step as CUDA graphs (torch.compile mode reduce-overhead)', is_flag=True)
@click.option('--profile-dir', help='Also profile one more run of each measurement; tables of operations go here', metavar='DIR', type=str, default=None)
@click.option('--json', 'json_path', help='Also write the results here (rewritten after each measurement)', metavar='PATH', type=str, default=None)
@click.option('--worker', is_flag=True, hidden=True)
@click.option('--worker-opts', type=str, default=None, hidden=True)
@click.option('--root', type=str, default=ROOT, hidden=True)
@click.option('--save-images', type=str, default=None, hidden=True)
@click.option('--profile', type=str, default=None, hidden=True)
def main(ref_root, configs, modes, what, device, steps, iters, peak_tflops, quick, timeout, batch, inductor, slow_ops, train_graphs, profile_dir, json_path, worker, worker_opts, root, save_images, profile):
    """Measure sampling and training speed; with --ref, print our/ref ratios.

    Sampled images are compared with this checkout's fp32 images of the same
    latents (PSNR in dB over uint8 pixels) when fp32 is among the modes.
    """
    if device is None:
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if quick:
        configs = configs or 'tiny-ddpmpp,tiny-adm'
        modes = 'fp32,bf16' if modes == ','.join(MODES) else modes
        steps, iters = min(steps, 3), 1
    configs = (configs or 'cifar10-ddpmpp,imagenet-adm').split(',')
    modes = modes.split(',')
    for name in configs:
        if name not in CONFIGS:
            raise click.ClickException(f'--configs: unknown configuration {name!r} (valid: {", ".join(CONFIGS)})')
    for mode in modes:
        if mode not in MODES:
            raise click.ClickException(f'--modes: unknown mode {mode!r} (valid: {", ".join(MODES)})')

    if worker:
        print(json.dumps(_worker(root, configs[0], modes[0], device, what, **json.loads(worker_opts), save_images=save_images, profile=profile)))
        return

    import numpy as np # pylint: disable=import-outside-toplevel
    sys.path.insert(0, ROOT) # the driver uses this checkout's helpers; the workers import theirs
    import dnnlib # pylint: disable=import-outside-toplevel
    for op in filter(None, slow_ops.split(',')):
        if op not in SLOW_OPS:
            raise click.ClickException(f'--slow-ops: unknown operation {op!r} (valid: {", ".join(SLOW_OPS)})')
    from psnr_dirs import psnr # pylint: disable=import-outside-toplevel
    opts = dict(steps=steps, iters=iters, batch=batch, inductor=inductor, slow_ops=slow_ops, train_graphs=train_graphs)
    roots = [('ours', ROOT)] + ([('ref', os.path.abspath(ref_root))] if ref_root else [])
    whats = ['sample', 'train'] if what == 'both' else [what]
    modes = sorted(modes, key=lambda m: m != 'fp32') # fp32 first: the other modes' images are compared with it
    results = []
    with tempfile.TemporaryDirectory() as image_dir:
        for config in configs:
            for w in whats:
                for mode in modes:
                    row = dict(config=config, what=w, mode=mode)
                    for label, path in roots:
                        images = os.path.join(image_dir, f'{config}-{mode}-{label}.npy') if w == 'sample' else None
                        row[label] = _run_worker(path, config, mode, device, w, opts, timeout, images, profile_dir)
                        baseline = os.path.join(image_dir, f'{config}-fp32-ours.npy')
                        if images and os.path.isfile(images) and os.path.isfile(baseline):
                            row[label]['psnr_vs_fp32'] = psnr(np.load(images), np.load(baseline))
                    results.append(row)
                    _print_row(row, peak_tflops, bool(ref_root))
                    if json_path:
                        with dnnlib.util.atomic_write(json_path, 'w') as f:
                            json.dump(results, f, indent=2)
    if ref_root:
        _print_summary(results)

def _print_summary(results):
    """Our fastest mode and our fp32 against the reference's fp32 (its default)."""
    print()
    for config in dict.fromkeys(r['config'] for r in results):
        for what, metric, higher in [('sample', 'images_per_sec', True), ('train', 'sec_per_kimg', False)]:
            rows = [r for r in results if r['config'] == config and r['what'] == what and metric in r['ours']]
            ref = [r['ref'] for r in rows if r['mode'] == 'fp32' and metric in r.get('ref', {})]
            if not rows or not ref:
                continue
            best = (max if higher else min)(rows, key=lambda r: r['ours'][metric])
            ours_fp32 = [r['ours'][metric] for r in rows if r['mode'] == 'fp32']
            speedup = lambda v: v / ref[0][metric] if higher else ref[0][metric] / v
            text = f"{config:15s} {what:6s} fastest ours ({best['mode']}) vs ref fp32: x{speedup(best['ours'][metric]):.2f}"
            if ours_fp32:
                text += f"; ours fp32 vs ref fp32: x{speedup(ours_fp32[0]):.2f}"
            print(text)

def _describe(res, metric, unit):
    """'12.345 img/s  35.2 dB' or the error of one measurement."""
    if 'error' in res or 'skipped' in res:
        return res.get('error') or res.get('skipped')
    text = f"{_fmt(res[metric], '9.3f')} {unit}"
    if 'psnr_vs_fp32' in res:
        text += f"  PSNR {_fmt(res['psnr_vs_fp32'], '5.1f')} dB"
    return text

def _print_row(row, peak_tflops, with_ref):
    ours = row['ours']
    metric, unit, better_higher = ('images_per_sec', 'img/s', True) if row['what'] == 'sample' else ('sec_per_kimg', 's/kimg', False)
    head = f"{row['config']:15s} {row['what']:6s} {row['mode']:5s}"
    if 'error' in ours or 'skipped' in ours:
        print(f"{head} ours: {_describe(ours, metric, unit)}", flush=True)
        if ours.get('log'):
            print(ours['log'], flush=True)
        return
    mfu = ours.get('achieved_tflops') / peak_tflops * 100 if ours.get('achieved_tflops') and ours['device'] != 'cpu' else None
    text = (f"{head} {_describe(ours, metric, unit)}  {_fmt(ours.get('gflop'), '7.2f')} GFLOP/img  "
            f"{_fmt(ours.get('peak_mem_gb'), '6.2f')} GB  MFU {_fmt(mfu, '5.1f')}%  warm-up {_fmt(ours.get('warmup_sec'), '.0f')} s  "
            f"[{ours['device_name']}]")
    if with_ref:
        ref = row['ref']
        text += f"  ref {_describe(ref, metric, unit)}"
        if metric in ref:
            ratio = ours[metric] / ref[metric] if better_higher else ref[metric] / ours[metric]
            text += f"  speed-up x{ratio:.2f}"
    print(text, flush=True)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
