"""Our generate.py path against the reference release's own edm_sampler, on the same pickle and seeds:
start-up (interpreter and imports), loading the pickle, and sampling, each a fresh process, run in
alternating pairs. The reference code is not part of this repository: give a checkout of NVlabs/edm.

    python bench/vs_reference.py --ref=/path/to/edm [--network=demo/edm-digits-16x16-cond.pkl] [--seeds=0-63]

Both sides draw the latents and labels as the reference's generate.py does, so the images must agree
(the largest pixel difference is printed). --profile=PATH writes cProfile statistics of our sampling.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each side prints one JSON line: seconds from process start to after the imports, the load and the sampling.
_COMMON = r'''
import json, sys, time
t_start = float(sys.argv[1])
net_pkl, seeds, steps, out, profile = sys.argv[2], [int(s) for s in sys.argv[3].split(',')], int(sys.argv[4]), sys.argv[5], sys.argv[6]
'''

OURS = _COMMON + r'''
sys.path.insert(0, sys.argv[7])
import numpy as np, torch
from torch_utils import distributed as dist
from training.generation import prepare_network, sample_batches
from training.network_io import load_network_pkl
t_import = time.time()
device = dist.init('cpu') # as generate.py: the thread count, the process group
net = prepare_network(load_network_pkl(net_pkl, verbose=False), device)
t_load = time.time()
def sample():
    return np.concatenate([images for _, images in sample_batches(net, seeds, device, max_batch_size=len(seeds), num_steps=steps)])
if profile:
    import cProfile
    cProfile.run('images = sample()', profile)
else:
    images = sample()
t_sample = time.time()
np.save(out, images)
print(json.dumps(dict(threads=torch.get_num_threads(), imports=t_import - t_start, load=t_load - t_import, sample=t_sample - t_load)))
'''

REFERENCE = _COMMON + r'''
sys.path.insert(0, sys.argv[7])
import pickle, numpy as np, torch
import dnnlib
from generate import edm_sampler, StackedRandomGenerator
t_import = time.time()
device = torch.device('cpu')
with dnnlib.util.open_url(net_pkl, verbose=False) as f:
    net = pickle.load(f)['ema'].to(device)
t_load = time.time()
rnd = StackedRandomGenerator(device, seeds)
latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
class_labels = None
if net.label_dim:
    class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
with torch.no_grad():
    images = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps)
images = (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
t_sample = time.time()
np.save(out, images)
print(json.dumps(dict(threads=torch.get_num_threads(), imports=t_import - t_start, load=t_load - t_import, sample=t_sample - t_load)))
'''

def run_side(code, path, cwd, net_pkl, seeds, steps, out, profile=''):
    """One fresh process; its phases in seconds, with the whole process's wall time."""
    start = time.time()
    res = subprocess.run([sys.executable, '-c', code, repr(start), net_pkl, ','.join(map(str, seeds)), str(steps), out, profile, path],
                         cwd=cwd, capture_output=True, text=True, check=False)
    total = time.time() - start
    if res.returncode != 0:
        raise click.ClickException(f'{"reference" if code is REFERENCE else "our"} side failed:\n{res.stderr.strip()}')
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), total=total)

@click.command()
@click.option('--ref', help='Checkout of NVlabs/edm', metavar='DIR', type=click.Path(exists=True, file_okay=False), required=True)
@click.option('--network', 'net_pkl', help='Network pickle', metavar='PATH', default=os.path.join(ROOT, 'demo', 'edm-digits-16x16-cond.pkl'), show_default=True)
@click.option('--seeds', help='Seeds, as first-last', metavar='A-B', default='0-63', show_default=True)
@click.option('--steps', help='Sampler steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--pairs', help='Alternating runs of each side', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--profile', help='Write cProfile statistics of our sampling (one more run) here', metavar='PATH', default=None)
def main(ref, net_pkl, seeds, steps, pairs, profile):
    """Time our sampling path against the reference release's edm_sampler."""
    first, last = (int(x) for x in seeds.split('-'))
    seeds = list(range(first, last + 1))
    net_pkl = os.path.abspath(net_pkl)
    results = dict(ours=[], reference=[])
    with tempfile.TemporaryDirectory() as tmp:
        outs = dict(ours=os.path.join(tmp, 'ours.npy'), reference=os.path.join(tmp, 'reference.npy'))
        for _ in range(pairs):
            results['reference'].append(run_side(REFERENCE, os.path.abspath(ref), tmp, net_pkl, seeds, steps, outs['reference']))
            results['ours'].append(run_side(OURS, ROOT, tmp, net_pkl, seeds, steps, outs['ours']))
        import numpy as np # pylint: disable=import-outside-toplevel
        diff = np.abs(np.load(outs['ours']).astype(int) - np.load(outs['reference']).astype(int)).max()
        if profile:
            run_side(OURS, ROOT, tmp, net_pkl, seeds, steps, outs['ours'], profile=os.path.abspath(profile))
    print(f'{len(seeds)} images, {steps} steps, {pairs} pairs, {results["ours"][0]["threads"]} threads (ours), '
          f'{results["reference"][0]["threads"]} (reference); median seconds:')
    print(f'{"":10s} {"imports":>8s} {"load":>8s} {"sample":>8s} {"process":>8s}')
    for side in ['reference', 'ours']:
        medians = [statistics.median(r[key] for r in results[side]) for key in ['imports', 'load', 'sample', 'total']]
        print(f'{side:10s} ' + ' '.join(f'{m:8.2f}' for m in medians))
    ratio = statistics.median(r['total'] for r in results['ours']) / statistics.median(r['total'] for r in results['reference'])
    print(f'ours / reference, whole process: {ratio:.3f}; largest pixel difference: {diff}')

if __name__ == '__main__':
    main()
