"""Score the demo digits model honestly with an independent classifier.

A support-vector classifier is trained on 80% of the real scikit-learn digits
(its held-out accuracy is printed), then classifies class-conditional samples
of the model, downsampled back to 8x8. Also prints a diversity figure: the
mean pairwise distance between samples of the same class, relative to the
same figure for the real digits, and the Frechet distance between samples and
real digits in a fixed feature space: the first 20 principal components of
the real digits as the model sees them (8x8 -> model resolution -> 8x8).
With --table, the same figures and the sampling time per image for the
low-step solvers of training/solvers.py over a list of NFE (demo/README.md).

    python demo/evaluate.py --network=demo/edm-digits-16x16-cond.pkl --num=1000
    python demo/evaluate.py --gnet=demo/edm-digits-16x16-guide.pkl --guidance=2 --num=500
    python demo/evaluate.py --solver=ipndm --steps=6 --num=1000
    python demo/evaluate.py --table --nfe=3,4,5,6,8,10,16,35 --num=1000 --out=demo/solvers-table.md
"""

import importlib.util
import os
import sys
import time

import click
import numpy as np
import PIL.Image
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.network_io import load_network_pkl # pylint: disable=wrong-import-position
from training.sampling import StackedRandomGenerator, edm_sampler # pylint: disable=wrong-import-position
from training.sampling_cli import check_guidance, check_guidance_options # pylint: disable=wrong-import-position
from training.generation_edm2 import edm2_sampler, is_edm2_network # pylint: disable=wrong-import-position
from training import solvers # pylint: disable=wrong-import-position
from fid import calculate_fid_from_inception_stats # pylint: disable=wrong-import-position
from torch_utils.misc import choose_device # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def to_digit_scale(images_uint8):
    """uint8 images [N, H, W] -> float [N, 64] on the 0..16 scale of the scikit-learn digits, at 8x8."""
    out = []
    for image in images_uint8:
        small = PIL.Image.fromarray(image, 'L').resize((8, 8), PIL.Image.BOX) if image.shape != (8, 8) else PIL.Image.fromarray(image, 'L')
        out.append(np.asarray(small, dtype=np.float64).reshape(-1) * (16 / 255))
    return np.stack(out)

def mean_pairwise_distance(x):
    """Mean Euclidean distance over all pairs of distinct rows."""
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    n = len(x)
    return d.sum() / (n * (n - 1))

def class_diversity(features, labels):
    """Mean over classes of the within-class mean pairwise distance."""
    return float(np.mean([mean_pairwise_distance(features[labels == c]) for c in np.unique(labels)]))

def pca_basis(features, num_components):
    """(mean, [D, K] projection) of the first `num_components` principal components of `features` [N, D]."""
    mean = features.mean(0)
    _u, _s, vt = np.linalg.svd(features - mean, full_matrices=False)
    return mean, vt[:num_components].T

def frechet_distance(features, features_ref):
    """Frechet distance between Gaussians fitted to two feature sets [N, K] (the FID formula)."""
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (features, features_ref)]
    return calculate_fid_from_inception_stats(*stats[0], *stats[1])

@torch.no_grad()
def sample_digits(net, num, steps, device, batch=250, sampler=edm_sampler, **sampler_kwargs):
    """`num` samples, class = seed % label_dim, seeds 0..num-1; returns uint8 [N, H, W] and classes.
    sampler_kwargs: those of `sampler` (any sampler of training/solvers.py), guidance included."""
    seeds = np.arange(num)
    classes = seeds % net.label_dim
    images = []
    for start in tqdm.tqdm(range(0, num, batch), desc='Sampling', unit='batch', leave=False):
        batch_seeds = seeds[start:start + batch]
        rnd = StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
        class_labels = torch.eye(net.label_dim, device=device)[torch.as_tensor(classes[start:start + batch], device=device)]
        if is_edm2_network(net): # EDM2: the EDM2 release's sampler, guided by gnet (training/generation_edm2.py)
            x = edm2_sampler(net, latents, class_labels, gnet=sampler_kwargs.get('gnet'), guidance=sampler_kwargs.get('guidance', 1),
                             randn_like=rnd.randn_like, num_steps=steps)
        else:
            x = sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps, **sampler_kwargs)
        images.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8)[:, 0].cpu().numpy())
    return np.concatenate(images), classes

class Scorer:
    """Classifier accuracy, diversity and Frechet distance of class-conditional digits at a model resolution."""

    def __init__(self, resolution):
        from sklearn.datasets import load_digits # pylint: disable=import-outside-toplevel
        from sklearn.model_selection import train_test_split # pylint: disable=import-outside-toplevel
        from sklearn.svm import SVC # pylint: disable=import-outside-toplevel
        digits = load_digits()
        real = digits.images.reshape(len(digits.images), -1).astype(np.float64)
        x_train, x_test, y_train, y_test = train_test_split(real, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
        self.classifier = SVC(gamma=0.001, C=10).fit(x_train, y_train)
        self.classifier_accuracy = self.classifier.score(x_test, y_test)
        # Real digits as the model sees them (8x8 -> model resolution Lanczos -> 8x8 box) and as they are.
        real_u8 = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
        real_up = np.stack([np.asarray(PIL.Image.fromarray(x, 'L').resize((resolution,) * 2, PIL.Image.LANCZOS)) for x in real_u8])
        self.real_features = to_digit_scale(real_up)
        self.real_diversity = class_diversity(self.real_features, digits.target)
        self.raw_diversity = class_diversity(real, digits.target)
        self.mean, self.basis = pca_basis(self.real_features, 20)

    def __call__(self, images, classes):
        """dict(accuracy, diversity, diversity_raw, distance) of uint8 samples [N, H, W] of the given classes."""
        features = to_digit_scale(images)
        sample_diversity = class_diversity(features, classes)
        return dict(accuracy=float((self.classifier.predict(features) == classes).mean()),
                    diversity=sample_diversity / self.real_diversity, diversity_raw=sample_diversity / self.raw_diversity,
                    distance=frechet_distance((features - self.mean) @ self.basis, (self.real_features - self.mean) @ self.basis))

#----------------------------------------------------------------------------
# The solver table of demo/README.md.

TABLE_ROWS = [ # (name, solver, options); the fast solvers at their published default orders
    ('EDM (Heun, Algorithm 2)', 'edm', {}),
    ('Euler', 'euler', {}),
    ('iPNDM (order 4)', 'ipndm', {}),
    ('DPM-Solver++(3M)', 'dpm_pp', {}),
    ('UniPC-bh2 (order 3)', 'unipc', {}),
    ('DEIS tAB (order 4)', 'deis', {}),
]
CANDIDATE_SCHEDULES = [dict(schedule='polynomial', rho=7), dict(schedule='logsnr'), dict(schedule='time_uniform', rho=2)]

def schedule_name(options):
    return options.get('schedule', 'polynomial') + (f' rho={options["rho"]:g}' if 'rho' in options and options['schedule'] != 'logsnr' else '')

def steps_for_nfe(solver, nfe, **options):
    """The num_steps that gives exactly `nfe` evaluations, or None (EDM's 2N - 1 is odd)."""
    for num_steps in range(1 if solver == 'edm' else 2, nfe + 3):
        if solvers.num_evaluations(solver, num_steps, options.get('max_order'), options.get('afs', False), options.get('denoise_to_zero', False)) == nfe:
            return num_steps
    return None

def run_cell(net, scorer, solver, nfe, num, device, batch=250, **options):
    """Sample and score one cell of the table; None when the solver cannot make exactly `nfe` evaluations."""
    steps = steps_for_nfe(solver, nfe, **options)
    if steps is None:
        return None
    start = time.perf_counter()
    images, classes = sample_digits(net, num, steps, device, batch=batch, sampler=(edm_sampler if solver == 'edm' else solvers.SOLVERS[solver]), **options)
    return dict(scorer(images, classes), seconds_per_image=(time.perf_counter() - start) / num, steps=steps)

def solver_table(net, scorer, nfes, num, pilot_num, pilot_nfes, device, log, batch=250, on_cell=lambda chosen, results: None):
    """Rows of the table: each fast solver on the schedule of lowest mean Frechet distance over pilot_nfes
    (pilot_num samples), then every NFE on that schedule with `num` samples: EDM's row, then the others, each in
    the order of `nfes` (a partial run then holds the NFE that matter most); on_cell(chosen, results) after each cell."""
    chosen = {}
    for name, solver, options in TABLE_ROWS:
        if solver == 'edm':
            chosen[name] = options
            continue
        scores = []
        for schedule in CANDIDATE_SCHEDULES:
            cells = [run_cell(net, scorer, solver, nfe, pilot_num, device, batch=batch, **options, **schedule) for nfe in pilot_nfes]
            scores.append(np.mean([cell['distance'] for cell in cells]))
            log(f'pilot {name}, {schedule_name(schedule)}: mean Frechet distance {scores[-1]:.3f} at NFE {pilot_nfes} ({pilot_num} samples)')
        chosen[name] = dict(options, **CANDIDATE_SCHEDULES[int(np.argmin(scores))])
    results = {name: {} for name in chosen}
    baseline = [(nfe, TABLE_ROWS[0]) for nfe in nfes] # EDM's row first: the reference of the others
    for nfe, (name, solver, _) in baseline + [(nfe, row) for nfe in nfes for row in TABLE_ROWS[1:]]: # NFE in the order given
        cell = run_cell(net, scorer, solver, nfe, num, device, batch=batch, **chosen[name])
        results[name][nfe] = cell
        if cell is not None:
            log(f'{name}, {schedule_name(chosen[name])}, NFE {nfe} ({cell["steps"]} steps): Frechet distance {cell["distance"]:.3f}, '
                f'accuracy {cell["accuracy"] * 100:.1f}%, {cell["seconds_per_image"] * 1e3:.1f} ms per image')
        on_cell(chosen, results)
    return chosen, results

def format_table(chosen, results, nfes):
    """Markdown: Frechet distance / classifier accuracy / ms per image, one row per solver, one column per NFE."""
    nfes = sorted(nfes)
    lines = ['| Solver (schedule) | ' + ' | '.join(f'NFE {nfe}' for nfe in nfes) + ' |', '| :-- |' + ' --: |' * len(nfes)]
    for name, options in chosen.items():
        label = name if name.startswith('EDM') else f'{name} ({schedule_name(options)})'
        cells = [('-' if results[name].get(nfe) is None else
                  '{distance:.2f} / {acc:.1f}% / {ms:.1f}'.format(distance=results[name][nfe]['distance'], acc=results[name][nfe]['accuracy'] * 100,
                                                                  ms=results[name][nfe]['seconds_per_image'] * 1e3)) for nfe in nfes]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, default='demo/edm-digits-16x16-cond.pkl', show_default=True)
@click.option('--num', help='Number of samples', metavar='INT', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--steps', help='Sampler steps (noise levels)', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--solver', help='Sampler of training/solvers.py', type=click.Choice(['edm', *solvers.SOLVERS]), default='edm', show_default=True)
@click.option('--schedule', help='Time schedule of the fast solvers', type=click.Choice(solvers.SCHEDULES), default=None)
@click.option('--rho', help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--order', 'max_order', help='Order of a multistep solver', metavar='INT', type=int, default=None)
@click.option('--afs', help='Analytical first step (saves one evaluation)', is_flag=True, default=None)
@click.option('--denoise-to-zero', help='End with one more evaluation, D(x; sigma_min)', is_flag=True, default=None)
@click.option('--batch', help='Samples per batch', metavar='INT', type=click.IntRange(min=1), default=250, show_default=True)
@click.option('--device', help='Device (default: CUDA when available)', metavar='STR', type=str, default=None)
@click.option('--guidance', help='Guidance weight w (1 = none)', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--gnet', 'gnet_pkl', help='Guiding network (autoguidance)  [default: classifier-free]', metavar='PATH|URL', type=str, default=None)
@click.option('--guidance-interval', help='Guide only for sigma in (LO, HI]', metavar='LO,HI', type=str, default=None)
@click.option('--allow-code', help='Load pickles that name code other than ours (runs the code they carry)', is_flag=True)
@click.option('--table', help='Score the solvers of demo/README.md over --nfe instead', is_flag=True)
@click.option('--nfe', 'nfe_list', help='With --table: network evaluations per image, in the order to run them', metavar='LIST', type=str, default='3,4,5,6,8,10,16,35', show_default=True)
@click.option('--pilot-num', help='With --table: samples per schedule trial', metavar='INT', type=click.IntRange(min=10), default=200, show_default=True)
@click.option('--pilot-nfe', help='With --table: NFE of the schedule trials', metavar='LIST', type=str, default='5,10', show_default=True)
@click.option('--out', help='With --table: also write the markdown table here', metavar='PATH', type=str, default=None)
def main(network_pkl, num, steps, solver, batch, device, guidance, gnet_pkl, guidance_interval, allow_code, table, nfe_list, pilot_num, pilot_nfe, out, **solver_options):
    """Classifier accuracy, diversity and Frechet distance of class-conditional samples."""
    if importlib.util.find_spec('sklearn') is None:
        raise click.ClickException('demo/evaluate.py needs scikit-learn (pip install scikit-learn)') from None

    solver_options = {key: value for key, value in solver_options.items() if value is not None}
    try:
        device = choose_device(device)
        net = load_network_pkl(network_pkl, allow_code=allow_code).to(device)
        gnet = load_network_pkl(gnet_pkl, allow_code=allow_code).to(device) if gnet_pkl is not None else None
        if not is_edm2_network(net):
            check_guidance(net, gnet, guidance)
        elif guidance != 1 and gnet is None:
            raise ValueError('--guidance: an EDM2 network is guided by a --gnet (autoguidance)')
        guidance_interval = check_guidance_options(guidance, gnet_pkl, guidance_interval)
        if guidance_interval is not None and is_edm2_network(net):
            raise ValueError('--guidance-interval: the EDM2 sampler guides at every noise level')
        nfes = [int(x) for x in nfe_list.split(',')]
        pilot_nfes = [int(x) for x in pilot_nfe.split(',')]
        if solver == 'edm' and solver_options:
            raise ValueError(f'{", ".join("--" + key.replace("_", "-") for key in solver_options)}: only with a --solver other than edm')
    except (ValueError, IOError) as err:
        raise click.ClickException(str(err))

    scorer = Scorer(net.img_resolution)
    print(f'Classifier held-out accuracy on real digits: {scorer.classifier_accuracy * 100:.2f}%')
    if table:
        started = time.time()
        def write(chosen, results):
            if out is not None:
                with open(out, 'w', encoding='utf-8') as f:
                    f.write(format_table(chosen, results, nfes))
        chosen, results = solver_table(net, scorer, nfes, num, pilot_num, pilot_nfes, device, log=lambda line: print(line, flush=True),
                                       batch=batch, on_cell=write)
        print(format_table(chosen, results, nfes) + f'({num} samples per cell; Frechet distance / classifier accuracy / ms per image '
              f'on {device}; {time.time() - started:.0f} s in all)')
        return

    start = time.perf_counter()
    sampler = edm_sampler if solver == 'edm' else solvers.SOLVERS[solver]
    images, classes = sample_digits(net, num, steps, device, batch=batch, sampler=sampler, gnet=gnet, guidance=guidance, guidance_interval=guidance_interval, **solver_options)
    seconds = time.perf_counter() - start
    scores = scorer(images, classes)
    nfe = solvers.num_evaluations(solver, steps, solver_options.get('max_order'), solver_options.get('afs', False), solver_options.get('denoise_to_zero', False))
    guided = 'unguided' if guidance == 1 else f'guidance {guidance:g} by {gnet_pkl or "the network without labels"}' + \
        ('' if guidance_interval is None else f' for sigma in ({guidance_interval[0]:g}, {guidance_interval[1]:g}]')
    print(f'Samples: {num}, {solver} sampler, {steps} steps (NFE {nfe}), {guided}, {seconds / num * 1e3:.1f} ms per image')
    print(f'Classifier accuracy on generated digits: {scores["accuracy"] * 100:.2f}%')
    print(f'Diversity relative to real digits at the model resolution: {scores["diversity"]:.3f} (relative to the raw 8x8 digits: {scores["diversity_raw"]:.3f})')
    print(f'Frechet distance to the real digits (20 principal components at 8x8): {scores["distance"]:.3f}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
