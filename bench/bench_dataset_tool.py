"""Time dataset_tool.py converting a full-size CIFAR-10 archive (synthetic
random images in the real cifar-10-python.tar.gz format) into a zip.

    python bench/bench_dataset_tool.py [--num-images 50000] [--threads 1]
"""

import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------

def write_cifar10_tarball(path, num_images, seed=0):
    """Five data_batch_N pickles (protocol 2, uint8 [N, 3072] rows, int labels) under cifar-10-batches-py/."""
    rng = np.random.default_rng(seed)
    sizes = [len(chunk) for chunk in np.array_split(np.arange(num_images), 5)]
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:
        for batch, n in enumerate(sizes, start=1):
            data = dict(
                batch_label = f'training batch {batch} of 5',
                labels      = rng.integers(0, 10, n).tolist(),
                data        = rng.integers(0, 256, [n, 3 * 32 * 32], dtype=np.uint8),
                filenames   = [f'synthetic_{batch}_{i}.png' for i in range(n)],
            )
            payload = pickle.dumps(data, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

#----------------------------------------------------------------------------

@click.command()
@click.option('--num-images', help='Images in the synthetic archive', type=int, default=50000, show_default=True)
@click.option('--threads',    help='OMP_NUM_THREADS for the converter', type=int, default=1, show_default=True)
def main(num_images, threads):
    """Benchmark dataset_tool.py on a synthetic full-size CIFAR-10 archive."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, 'cifar-10-python.tar.gz')
        dest = os.path.join(tmp, 'cifar10-32x32.zip')
        t0 = time.perf_counter()
        write_cifar10_tarball(source, num_images)
        print(f'Wrote {num_images} synthetic images ({os.path.getsize(source) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s')

        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, os.path.join(ROOT, 'dataset_tool.py'), f'--source={source}', f'--dest={dest}']
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f'dataset_tool.py failed ({res.returncode}):\n{res.stderr}')
        with zipfile.ZipFile(dest) as z:
            num_written = sum(name.endswith('.png') for name in z.namelist())
        if num_written != num_images:
            sys.exit(f'expected {num_images} images in {dest}, found {num_written}')
        print(f'dataset_tool.py: {num_images} images in {seconds:.1f} s = {num_images / seconds:.0f} images/s '
              f'({os.path.getsize(dest) / 2**20:.1f} MiB zip)')

#----------------------------------------------------------------------------

if __name__ == "__main__":
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
