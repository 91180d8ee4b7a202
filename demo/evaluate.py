"""Score the demo digits model honestly with an independent classifier.

A support-vector classifier is trained on 80% of the real scikit-learn digits
(its held-out accuracy is printed), then classifies class-conditional samples
of the model, downsampled back to 8x8. Also prints a diversity figure: the
mean pairwise distance between samples of the same class, relative to the
same figure for the real digits, and the Frechet distance between samples and
real digits in a fixed feature space: the first 20 principal components of
the real digits as the model sees them (8x8 -> model resolution -> 8x8).

    python demo/evaluate.py --network=demo/edm-digits-16x16-cond.pkl --num=1000
    python demo/evaluate.py --gnet=demo/edm-digits-16x16-guide.pkl --guidance=2 --num=500
"""

import os
import sys

import click
import numpy as np
import PIL.Image
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.network_io import load_network_pkl # pylint: disable=wrong-import-position
from training.sampling import StackedRandomGenerator, edm_sampler, check_guidance, parse_guidance_interval # pylint: disable=wrong-import-position
from training.generation_edm2 import edm2_sampler, is_edm2_network # pylint: disable=wrong-import-position
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
def sample_digits(net, num, steps, device, batch=250, **guidance_kwargs):
    """`num` samples, class = seed % label_dim, seeds 0..num-1; returns uint8 [N, H, W] and classes.
    guidance_kwargs: gnet, guidance, guidance_interval of edm_sampler."""
    seeds = np.arange(num)
    classes = seeds % net.label_dim
    images = []
    for start in tqdm.tqdm(range(0, num, batch), desc='Sampling', unit='batch'):
        batch_seeds = seeds[start:start + batch]
        rnd = StackedRandomGenerator(device, batch_seeds)
        latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
        class_labels = torch.eye(net.label_dim, device=device)[torch.as_tensor(classes[start:start + batch], device=device)]
        if is_edm2_network(net): # EDM2: the EDM2 release's sampler, guided by gnet (training/generation_edm2.py)
            x = edm2_sampler(net, latents, class_labels, gnet=guidance_kwargs.get('gnet'), guidance=guidance_kwargs.get('guidance', 1),
                             randn_like=rnd.randn_like, num_steps=steps)
        else:
            x = edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps, **guidance_kwargs)
        images.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8)[:, 0].cpu().numpy())
    return np.concatenate(images), classes

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl', help='Network pickle', metavar='PATH|URL', type=str, default='demo/edm-digits-16x16-cond.pkl', show_default=True)
@click.option('--num', help='Number of samples', metavar='INT', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--steps', help='Sampler steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--device', help='Device (default: CUDA when available)', metavar='STR', type=str, default=None)
@click.option('--guidance', help='Guidance weight w (1 = none)', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--gnet', 'gnet_pkl', help='Guiding network (autoguidance)  [default: classifier-free]', metavar='PATH|URL', type=str, default=None)
@click.option('--guidance-interval', help='Guide only for sigma in (LO, HI]', metavar='LO,HI', type=str, default=None)
@click.option('--allow-code', help='Load pickles that name code other than ours (runs the code they carry)', is_flag=True)
def main(network_pkl, num, steps, device, guidance, gnet_pkl, guidance_interval, allow_code):
    """Classifier accuracy, diversity and Frechet distance of class-conditional samples."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC
    except ImportError:
        raise click.ClickException('demo/evaluate.py needs scikit-learn (pip install scikit-learn)') from None

    try:
        device = choose_device(device)
        net = load_network_pkl(network_pkl, allow_code=allow_code).to(device)
        gnet = load_network_pkl(gnet_pkl, allow_code=allow_code).to(device) if gnet_pkl is not None else None
        if not is_edm2_network(net):
            check_guidance(net, gnet, guidance)
        elif guidance != 1 and gnet is None:
            raise ValueError('--guidance: an EDM2 network is guided by a --gnet (autoguidance)')
        guidance_interval = parse_guidance_interval(guidance_interval)
        if guidance_interval is not None and is_edm2_network(net):
            raise ValueError('--guidance-interval: the EDM2 sampler guides at every noise level')
    except (ValueError, IOError) as err:
        raise click.ClickException(str(err))

    digits = load_digits()
    real = digits.images.reshape(len(digits.images), -1).astype(np.float64)
    x_train, x_test, y_train, y_test = train_test_split(real, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    classifier = SVC(gamma=0.001, C=10).fit(x_train, y_train)
    print(f'Classifier held-out accuracy on real digits: {classifier.score(x_test, y_test) * 100:.2f}%')

    images, classes = sample_digits(net, num, steps, device, gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)
    features = to_digit_scale(images)
    accuracy = float((classifier.predict(features) == classes).mean())
    sample_diversity = class_diversity(features, classes)
    # Real digits as the model sees them (8x8 -> 16x16 Lanczos -> 8x8 box) and as they are.
    real_u8 = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    real_up = np.stack([np.asarray(PIL.Image.fromarray(x, 'L').resize((net.img_resolution,) * 2, PIL.Image.LANCZOS)) for x in real_u8])
    diversity = sample_diversity / class_diversity(to_digit_scale(real_up), digits.target)
    diversity_raw = sample_diversity / class_diversity(real, digits.target)
    real_features = to_digit_scale(real_up)
    mean, basis = pca_basis(real_features, 20)
    distance = frechet_distance((features - mean) @ basis, (real_features - mean) @ basis)
    guided = 'unguided' if guidance == 1 else f'guidance {guidance:g} by {gnet_pkl or "the network without labels"}' + \
        ('' if guidance_interval is None else f' for sigma in ({guidance_interval[0]:g}, {guidance_interval[1]:g}]')
    print(f'Samples: {num}, {steps} steps (NFE {2 * steps - 1}), {guided}')
    print(f'Classifier accuracy on generated digits: {accuracy * 100:.2f}%')
    print(f'Diversity relative to real digits at the model resolution: {diversity:.3f} (relative to the raw 8x8 digits: {diversity_raw:.3f})')
    print(f'Frechet distance to the real digits (20 principal components at 8x8): {distance:.3f}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
