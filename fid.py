"""Frechet Inception Distance (FID): reference statistics of a dataset, and
the FID of a set of images (or of a network's samples) against them."""

import os
import re
import sys
import zipfile

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence, safe_pickle
from torch_utils.misc import choose_device
from training import generation_edm2
from training.generation import prepare_network, sample_batches, sampler_name, split_batches
from training.sampling_cli import check_guidance, check_guidance_options, check_sampler_range, option_name, parse_seeds, resolve_sampler, sampler_options

#----------------------------------------------------------------------------

# Inception-v3 (the TensorFlow 2015-12-05 graph ported to PyTorch).
DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

# SHA-256 of the published detector pickle, when known: a file with this digest (downloaded, cached or local)
# loads in full, running the code it carries. None: not pinned, so only the bytes that this process itself
# downloads from DETECTOR_URL are trusted (downloaded afresh each time, never taken from the cache by name);
# a local copy needs --allow-code.
DETECTOR_SHA256 = None
MAX_DETECTOR_BYTES = 1 << 30 # Larger files are not hashed to compare with DETECTOR_SHA256.

#----------------------------------------------------------------------------
# Loading the detector and the reference statistics.

def _is_torchscript(f):
    """Is the open file a TorchScript archive (torch.jit.save)? Told by its content: a zip with constants.pkl or code/ records."""
    head = f.read(4)
    f.seek(0)
    if head != safe_pickle.ZIP_MAGIC:
        return False
    try:
        with zipfile.ZipFile(f) as z:
            return safe_pickle.is_torchscript_zip(z.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        return False
    finally:
        f.seek(0)

def _has_pinned_digest(path):
    if DETECTOR_SHA256 is None or os.path.getsize(path) > MAX_DETECTOR_BYTES:
        return False
    return dnnlib.util.file_sha256(path) == DETECTOR_SHA256

def _open_detector(detector_url, verbose):
    """(open file, trusted): the published detector's bytes are trusted by their pinned digest, or, with none
    pinned, when this process downloads them from DETECTOR_URL itself; any other file is not."""
    if detector_url == DETECTOR_URL and DETECTOR_SHA256 is None:
        return dnnlib.util.open_url(detector_url, verbose=verbose, cache=False), True
    sha256 = DETECTOR_SHA256 if detector_url == DETECTOR_URL else None
    path = dnnlib.util.open_url(detector_url, verbose=verbose, return_filename=True, sha256=sha256)
    return dnnlib.util.open_regular(path), _has_pinned_digest(path)

def _read_detector(detector_url, verbose, allow_code):
    """The detector module: the trusted published detector or any file with allow_code loads in full; otherwise
    a pickle is unpickled safely and a TorchScript archive (code) is refused."""
    f, trusted = _open_detector(detector_url, verbose)
    with f:
        if _is_torchscript(f):
            if not allow_code:
                raise persistence.CodeNotAllowedError('it is a TorchScript archive, whose code safe loading does not run')
            return torch.jit.load(f, map_location='cpu')
        return persistence.load(f, allow_code=(allow_code or trusted), name=detector_url)

def load_detector(detector_url=DETECTOR_URL, device=None, verbose=True, allow_code=False):
    """Load the feature detector from a path or URL and move it to `device`. The published detector loads in
    full (see DETECTOR_SHA256); any other file must be a pickle naming only our classes unless allow_code=True."""
    if verbose:
        print(f'Loading feature detector from "{detector_url}"...', flush=True)
    try:
        detector = _read_detector(detector_url, verbose, allow_code)
    except FileNotFoundError:
        raise FileNotFoundError(f'feature detector not found: {detector_url}') from None
    except OSError as err:
        if not dnnlib.util.is_url(detector_url):
            raise IOError(f'cannot read the feature detector {detector_url}: {dnnlib.util.os_error_message(err)}') from None
        reason = ' '.join(str(err).replace(f' {detector_url}', '').split())
        raise IOError(f'cannot download the feature detector {detector_url}; download it where there is a connection and '
                      f'pass the local file with --detector=PATH --allow-code ({reason})') from None
    except Exception as err: # pylint: disable=broad-exception-caught
        if isinstance(err, ValueError) and detector_url in str(err) and '\n' not in str(err):
            raise ValueError(str(err)) from None
        raise ValueError(persistence.load_error_message(f'the feature detector {detector_url}', 'feature detector', err)) from None
    if not callable(detector) or not hasattr(detector, 'to'):
        raise ValueError(f'{detector_url} holds a {type(detector).__name__}, not a feature detector module')
    return detector.to(choose_device(device)) # used as pickled (the published detector is ready for inference)

def load_stats(stats_path, verbose=True):
    """Read `mu` [D] and `sigma` [D, D] from a statistics .npz given as a path or URL."""
    try:
        with dnnlib.util.open_url(stats_path, verbose=verbose) as f:
            data = np.load(f, allow_pickle=False)
            stats = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else None
    except FileNotFoundError:
        raise FileNotFoundError(f'reference statistics not found: {stats_path}') from None
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f'{stats_path} is not a readable .npz file ({err})') from None
    if stats is None or 'mu' not in stats or 'sigma' not in stats:
        found = 'a single array' if stats is None else (', '.join(stats) or 'nothing')
        raise ValueError(f'{stats_path} holds no FID statistics: expected arrays mu and sigma, found {found}')
    mu, sigma = stats['mu'], stats['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] == 0:
        raise ValueError(f'{stats_path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]')
    check_stats(mu, sigma, stats_path)
    return mu, sigma

def check_stats(mu, sigma, name):
    """Raise ValueError unless mu and sigma are finite real numbers and sigma is symmetric and positive
    semi-definite, both to 1e-6 of its largest variance (float32 round-off passes)."""
    if mu.dtype.kind not in 'iuf' or sigma.dtype.kind not in 'iuf':
        raise ValueError(f'{name}: mu and sigma must be real numbers, got {mu.dtype} and {sigma.dtype}')
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{name}: mu or sigma holds infinite or NaN values')
    tol = 1e-6 * max(np.abs(np.diag(sigma)).max(), np.finfo(np.float64).tiny)
    asymmetry = np.abs(sigma - sigma.T).max()
    if asymmetry > tol:
        raise ValueError(f'{name}: sigma is not symmetric (differs from its transpose by {asymmetry:g}), so it is not a covariance')
    try:
        np.linalg.cholesky((sigma + sigma.T) / 2 + tol * np.eye(len(sigma)))
    except np.linalg.LinAlgError:
        raise ValueError(f'{name}: sigma is not positive semi-definite (an eigenvalue below -{tol:g}), so it is not a covariance') from None

def _rank_batches(items, max_batch_size):
    """This rank's non-empty batches of `items` (at most max_batch_size each, round-robin over ranks, as generate.py)."""
    batches = split_batches(items, max_batch_size, dist.get_rank(), dist.get_world_size())
    return [batch for batch in batches if len(batch) > 0]

#----------------------------------------------------------------------------
# Feature statistics, accumulated in float64 and summed over ranks.

def _feature_dim(detector, image_shape, device, detector_name):
    """Run the detector on one blank image: check that it returns [N, D] features and return D."""
    _channels, height, width = image_shape
    images = torch.zeros([1, 3, height, width], dtype=torch.uint8, device=device)
    features = _detect(detector, images, detector_name)
    return features.shape[1]

def _detect(detector, images, detector_name):
    """Features [N, D] of uint8 images [N, C, H, W]; one-channel images are repeated to three."""
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    try:
        features = detector(images, return_features=True)
    except TypeError as err:
        raise ValueError(f'{detector_name} cannot be called as detector(images, return_features=True): {err}') from None
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f'{detector_name} returned {got} for a batch of {images.shape[0]}; expected [N, D] features')
    return features

def accumulate_stats(detector, batches, image_shape, num_batches=None, device=None, detector_name='the feature detector', feature_dim=None,
                     num_images=None, allow_rank_deficient=True):
    """Mean and covariance (numpy float64) of the features of uint8 image batches [N, C, H, W],
    summed over all ranks; every rank must call this. Unless allow_rank_deficient, fewer num_images
    than feature dimensions plus one (a singular covariance) is an error before the first batch."""
    device = choose_device(device)
    if image_shape[0] not in (1, 3):
        raise ValueError(f'images have {image_shape[0]} channels; the detector takes RGB or grayscale images')
    with torch.no_grad():
        dim = _feature_dim(detector, image_shape, device, detector_name)
        if feature_dim is not None and dim != feature_dim:
            raise ValueError(f'{detector_name} gives {dim}-dimensional features, '
                             f'but the reference statistics are {feature_dim}-dimensional')
        if not allow_rank_deficient and num_images is not None and num_images <= dim:
            raise ValueError(f'{num_images} images give a covariance of rank at most {num_images - 1} for {dim}-dimensional features, '
                             f'which makes a poor FID reference; use at least {dim + 1} images, or --allow-rank-deficient')
        acc_device = device if device.type in ('cpu', 'cuda') else torch.device('cpu') # float64 support
        sum_f = torch.zeros([dim], dtype=torch.float64, device=acc_device)        # sum of f
        sum_ff = torch.zeros([dim, dim], dtype=torch.float64, device=acc_device)  # sum of f^T f
        count = torch.zeros([], dtype=torch.float64, device=acc_device)           # number of images
        for images in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(dist.get_rank() != 0)):
            features = _detect(detector, images.to(device), detector_name)
            if features.shape[1] != dim:
                raise ValueError(f'{detector_name} returned {features.shape[1]} features per image instead of {dim}')
            features = features.to(acc_device, torch.float64)
            sum_f += features.sum(0)
            sum_ff += features.T @ features
            count += features.shape[0]
        for tensor in (sum_f, sum_ff, count):
            dist.all_reduce_sum(tensor)
    n = count.item()
    if n < 2:
        raise ValueError(f'FID statistics need at least 2 images, got {int(n)}')
    mu = sum_f.cpu().numpy() / n
    sigma = (sum_ff.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma

#----------------------------------------------------------------------------
# Statistics of a folder or zip of images.

def calculate_inception_stats(
    image_path,                     # Folder or zip of images.
    num_expected    = None,         # Number of images to use (a random subset when there are more); None: all.
    seed            = 0,            # Seed of the random subset.
    max_batch_size  = 64,           # Images per batch, per rank.
    num_workers     = 3,            # DataLoader worker processes that decode the images.
    prefetch_factor = 2,            # Batches loaded in advance by each worker.
    device          = None,         # Device of the detector; None: CUDA when available.
    detector_url    = DETECTOR_URL, # Feature detector pickle (path or URL).
    feature_dim     = None,         # Expected feature size (of the reference statistics), checked before the first batch.
    allow_code      = False,        # Load a detector pickle that names code other than ours?
    allow_rank_deficient = True,    # Accept fewer images than feature dimensions plus one (a singular covariance)?
):
    """Feature statistics (mu, sigma) of the images in `image_path`, over all ranks."""
    from training.dataset import ImageFolderDataset
    device = choose_device(device)
    dist.print0(f'Loading images from "{image_path}"...')
    dataset = ImageFolderDataset(path=image_path, max_size=num_expected, random_seed=seed)
    if num_expected is not None and len(dataset) < num_expected:
        raise ValueError(f'found {len(dataset)} images in {image_path}, but {num_expected} were requested (--num)')
    if len(dataset) < 2:
        raise ValueError(f'found {len(dataset)} image(s) in {image_path}; FID statistics need at least 2')
    if dataset.image_shape[0] not in (1, 3):
        raise ValueError(f'the images in {image_path} have {dataset.image_shape[0]} channels; the detector takes RGB or grayscale images')
    detector = dist.rank0_first(lambda: load_detector(detector_url, device=device, verbose=(dist.get_rank() == 0), allow_code=allow_code))

    dist.print0(f'Calculating statistics for {len(dataset)} images...')
    batches = _rank_batches(list(range(len(dataset))), max_batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         prefetch_factor=(prefetch_factor if num_workers > 0 else None))
    images = (images for images, _labels in loader) # the dataset rejects images of another shape than the first
    return accumulate_stats(detector, images, dataset.image_shape, num_batches=len(batches), device=device,
                            detector_name=f'the feature detector {detector_url}', feature_dim=feature_dim,
                            num_images=len(dataset), allow_rank_deficient=allow_rank_deficient)

#----------------------------------------------------------------------------
# Statistics of a network's samples, generated in memory exactly as
# generate.py writes them (same seeds, same pixels).

def generate_image_batches(net, seeds, max_batch_size=64, class_idx=None, device=None, **sampler_kwargs):
    """Yield this rank's uint8 images [B, C, H, W] of `seeds`: the pixels of generate.py's PNGs, without writing them."""
    for _batch_seeds, images in sample_batches(net, seeds, choose_device(device), class_idx=class_idx, max_batch_size=max_batch_size, **sampler_kwargs):
        yield torch.from_numpy(images).permute(0, 3, 1, 2)

def calculate_inception_stats_for_network(
    network_pkl,                    # Network pickle (path or URL).
    seeds,                          # List of seeds, one image each.
    max_batch_size  = 64,           # Images per batch, per rank.
    class_idx       = None,         # Class of every image; None: random.
    device          = None,         # Device of the network and the detector; None: CUDA when available.
    precision       = 'fp32',       # Network precision as in generate.py: fp32 (faithful), tf32, bf16, fp16.
    use_compile     = False,        # torch.compile the network, as generate.py --compile?
    detector_url    = DETECTOR_URL, # Feature detector pickle (path or URL).
    feature_dim     = None,         # Expected feature size (of the reference statistics), checked before sampling.
    allow_code      = False,        # Load pickles (network, detector) that name code other than ours?
    gnet_pkl        = None,         # Guiding network pickle (autoguidance); None: classifier-free when guidance != 1.
    guidance        = 1,            # Guidance weight w (1 = none).
    guidance_interval = None,       # Guide only for sigma in (lo, hi]; None: at every noise level.
    sampler         = None,         # 'edm' | 'ablation' | a solver of training/solvers.py; None: as generate.py chooses.
    **sampler_kwargs,               # Its options (num_steps, sigma_min, ...).
):
    """Feature statistics (mu, sigma) of the network's samples for `seeds`, over all ranks."""
    from training.network_io import load_network_data, load_network_pkl
    device = choose_device(device)
    if len(seeds) < 2:
        raise ValueError(f'{len(seeds)} seed(s) given; FID statistics need at least 2 images')
    dist.print0(f'Loading network from "{network_pkl}"...')
    data = dist.rank0_first(lambda: load_network_data(network_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
    net = data['ema']
    sampler = sampler_name(sampler, sampler_kwargs)
    if generation_edm2.is_edm2_network(net): # EDM2: the EDM2 release's sampler (or a solver) and the pickle's encoder
        if sampler == 'edm':
            sampler_kwargs = generation_edm2.edm2_sampler_kwargs(net, **sampler_kwargs)
        generation_edm2.check_edm2_options(sampler, sampler_kwargs, guidance_interval, precision, use_compile)
        if guidance_interval is not None:
            sampler_kwargs['guidance_interval'] = guidance_interval
        gnet = None if gnet_pkl is None else dist.rank0_first(lambda: load_network_pkl(gnet_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        batches = (torch.as_tensor(images) for _, images in generation_edm2.edm2_image_batches(
            net.to(device), generation_edm2.default_encoder(data), seeds, device, max_batch_size, class_idx=class_idx,
            gnet=(gnet.to(device) if gnet is not None else None), guidance=guidance, sampler=sampler, **sampler_kwargs))
        detector = dist.rank0_first(lambda: load_detector(detector_url, device=device, verbose=(dist.get_rank() == 0), allow_code=allow_code))
        return accumulate_stats(detector, batches, [net.img_channels, net.img_resolution, net.img_resolution],
                                num_batches=len(_rank_batches(seeds, max_batch_size)), device=device,
                                detector_name=f'the feature detector {detector_url}', feature_dim=feature_dim)
    check_sampler_range(net, sampler, sampler_kwargs)
    gnet = None
    if gnet_pkl is not None:
        dist.print0(f'Loading guiding network from "{gnet_pkl}"...')
        gnet = dist.rank0_first(lambda: load_network_pkl(gnet_pkl, verbose=(dist.get_rank() == 0), allow_code=allow_code))
    check_guidance(net, gnet, guidance)
    net = prepare_network(net, device, precision=precision, use_compile=use_compile)
    if gnet is not None:
        gnet = prepare_network(gnet, device, precision=precision, use_compile=use_compile)
    sampler_kwargs.update(gnet=gnet, guidance=guidance, guidance_interval=guidance_interval)
    detector = dist.rank0_first(lambda: load_detector(detector_url, device=device, verbose=(dist.get_rank() == 0), allow_code=allow_code))

    dist.print0(f'Calculating statistics for {len(seeds)} generated images...')
    image_shape = [net.img_channels, net.img_resolution, net.img_resolution]
    batches = generate_image_batches(net, seeds, max_batch_size=max_batch_size, class_idx=class_idx, device=device, sampler=sampler, **sampler_kwargs)
    return accumulate_stats(detector, batches, image_shape, num_batches=len(_rank_batches(seeds, max_batch_size)),
                            device=device, detector_name=f'the feature detector {detector_url}', feature_dim=feature_dim)

#----------------------------------------------------------------------------

def calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref):
    """FID = |mu - mu_ref|^2 + trace(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), real part."""
    if np.shape(mu) != np.shape(mu_ref) or np.shape(sigma) != np.shape(sigma_ref):
        raise ValueError(f'statistics of different sizes: mu {list(np.shape(mu))} vs {list(np.shape(mu_ref))}')
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))

#----------------------------------------------------------------------------
# Command line.

def _one_line(err):
    """The message of an error as one line; errors re-raised from DataLoader workers keep only the original message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        return re.sub(r'^[\w.]+: ', '', lines[-1])
    return ' '.join(lines) or type(err).__name__

def _print_fid(fid, scale):
    """Print the FID, never below zero: round-off (at most 1e-6 of `scale`, the total variance of both
    statistics) is printed as 0; a larger negative value also prints a warning on stderr."""
    if fid < -1e-6 * scale:
        print(f'Warning: the FID formula gave {fid:g} (below zero beyond round-off); printing 0', file=sys.stderr, flush=True)
    print(f'{max(fid, 0.0):g}', flush=True)

def _default_workers(num_workers):
    """--workers: 3 unless the process may use fewer CPUs."""
    if num_workers is not None:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(3, cpus)

def _finish():
    dist.barrier()
    dist.finish()

def _common_options(fn):
    """--detector, --device and --workers, on both commands."""
    fn = click.option('--workers', 'num_workers',  help='DataLoader processes that decode images  [default: 3, at most the CPU count]', metavar='INT', type=click.IntRange(min=0), default=None)(fn)
    fn = click.option('--device',                  help='Device, e.g. cpu or cuda:1  [default: CUDA when available]', metavar='STR',             type=str, default=None)(fn)
    fn = click.option('--allow-code',              help='Load pickles that name code other than ours (runs the code they carry)', is_flag=True)(fn)
    fn = click.option('--detector', 'detector_url', help='Feature detector pickle (Inception-v3)  [default: the published one]', metavar='PATH|URL', type=str, default=DETECTOR_URL)(fn)
    return fn

@click.group()
def main():
    """FID of generated images against reference statistics, and the reference statistics of a dataset.

    Examples:

    \b
    # Generate 50000 images and save them as fid-tmp/*/*.png
    torchrun --standalone --nproc_per_node=1 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl

    \b
    # Calculate FID
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Or sample the same images in memory, without writing them
    torchrun --standalone --nproc_per_node=1 fid.py calc --seeds=0-49999 \\
        --network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Compute dataset reference statistics
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    """

#----------------------------------------------------------------------------

# Options of calc that only apply with --network (None when not given), beside the sampler options.
_network_options = dict(seeds='--seeds', class_idx='--class', precision='--precision', compile_net='--compile',
                        guidance='--guidance', gnet_pkl='--gnet', guidance_interval='--guidance-interval')

@main.command()
@click.option('--images', 'image_path',    help='Path to the images', metavar='PATH|ZIP',                             type=str)
@click.option('--network', 'network_pkl',  help='Sample the images from this network instead', metavar='PATH|URL',    type=str)
@click.option('--ref', 'ref_path',         help='Dataset reference statistics', metavar='NPZ|URL',                  type=str, required=True)
@click.option('--num', 'num_expected',     help='Number of images to use', metavar='INT',                             type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                    help='Random seed for selecting the images', metavar='INT',                type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',                                  type=click.IntRange(min=1), default=64, show_default=True)
@_common_options

@click.option('--seeds',                   help='With --network: random seeds (e.g. 1,2,5-10)  [default: 0-49999]', metavar='LIST', type=str)
@click.option('--class', 'class_idx',      help='With --network: class label  [default: random]', metavar='INT',     type=click.IntRange(min=0))
@sampler_options(prefix='With --network: ')
@click.option('--precision',               help='With --network: network precision, as in generate.py  [default: fp32]', type=click.Choice(['fp32', 'tf32', 'bf16', 'fp16']))
@click.option('--compile', 'compile_net',  help='With --network: torch.compile the network, as in generate.py', is_flag=True, default=None)
@click.option('--guidance',                help='With --network: guidance weight w  [default: 1 = none]', metavar='FLOAT', type=float)
@click.option('--gnet', 'gnet_pkl',        help='With --network: guiding network (autoguidance)  [default: classifier-free]', metavar='PATH|URL', type=str)
@click.option('--guidance-interval',       help='With --network: guide only for noise levels in (LO, HI]', metavar='LO,HI', type=str)

def calc(image_path, network_pkl, ref_path, num_expected, seed, max_batch_size, detector_url, allow_code, device, num_workers, **network_kwargs):
    """Calculate FID for a given set of images (or a network's samples)."""
    # Check the options.
    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    if (image_path is None) == (network_pkl is None):
        raise click.ClickException('give exactly one of --images and --network')
    given_network_options = [_network_options.get(name) or option_name(name) for name, value in network_kwargs.items() if value is not None]
    if image_path is not None and given_network_options:
        raise click.ClickException(f'{", ".join(given_network_options)}: only with --network')
    if network_pkl is not None and (given('num_expected') or given('seed')):
        raise click.ClickException('--num and --seed select images of --images; with --network, use --seeds')
    try:
        seeds = parse_seeds(network_kwargs.pop('seeds') or '0-49999')
    except ValueError as err:
        raise click.ClickException(f'--seeds: {err}')
    class_idx = network_kwargs.pop('class_idx')
    precision = network_kwargs.pop('precision') or 'fp32'
    use_compile = bool(network_kwargs.pop('compile_net'))
    guide_kwargs = dict(gnet_pkl=network_kwargs.pop('gnet_pkl'), guidance=network_kwargs.pop('guidance'))
    if guide_kwargs['guidance'] is None:
        guide_kwargs['guidance'] = 1
    try:
        guide_kwargs['guidance_interval'] = check_guidance_options(guide_kwargs['guidance'], guide_kwargs['gnet_pkl'], network_kwargs.pop('guidance_interval'))
        sampler, sampler_kwargs = resolve_sampler(**network_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err))

    try:
        device = dist.init(device)
        dist.print0(f'Loading dataset reference statistics from "{ref_path}"...')
        mu_ref, sigma_ref = dist.rank0_first(lambda: load_stats(ref_path, verbose=(dist.get_rank() == 0)))
        common = dict(max_batch_size=max_batch_size, device=device, detector_url=detector_url, feature_dim=mu_ref.shape[0], allow_code=allow_code)
        if image_path is not None:
            mu, sigma = calculate_inception_stats(image_path, num_expected=num_expected, seed=seed,
                                                  num_workers=_default_workers(num_workers), **common)
        else:
            mu, sigma = calculate_inception_stats_for_network(network_pkl, seeds, class_idx=class_idx, precision=precision, use_compile=use_compile,
                                                              **common, **guide_kwargs, sampler=sampler, **sampler_kwargs)
        dist.print0('Calculating FID...')
        if dist.get_rank() == 0:
            fid = calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref)
            _print_fid(fid, scale=np.trace(sigma) + np.trace(sigma_ref))
        _finish()
    except (ValueError, OSError) as err:
        raise click.ClickException(_one_line(err)) from None

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path',    help='Path to the dataset', metavar='PATH|ZIP',                            type=str, required=True)
@click.option('--dest', 'dest_path',       help='Destination .npz file', metavar='NPZ',                               type=str, required=True)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT',                                  type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--allow-rank-deficient',    help='Accept fewer images than feature dimensions (a singular covariance)', is_flag=True)
@_common_options

def ref(dataset_path, dest_path, max_batch_size, allow_rank_deficient, detector_url, allow_code, device, num_workers):
    """Calculate dataset reference statistics needed by 'calc'."""
    try:
        device = dist.init(device)
        mu, sigma = calculate_inception_stats(dataset_path, max_batch_size=max_batch_size, num_workers=_default_workers(num_workers),
                                              device=device, detector_url=detector_url, allow_code=allow_code,
                                              allow_rank_deficient=allow_rank_deficient)
        if not dest_path.endswith('.npz'):
            dest_path += '.npz' # as np.savez names it
        dist.print0(f'Saving dataset reference statistics to "{dest_path}"...')
        if dist.get_rank() == 0:
            with dnnlib.util.atomic_write(dest_path) as f: # folders created as needed
                np.savez(f, mu=mu, sigma=sigma)
        _finish()
    except (ValueError, OSError) as err:
        raise click.ClickException(_one_line(err)) from None

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
