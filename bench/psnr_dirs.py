"""PSNR between two folders of PNGs with the same names (e.g. generate.py
output at two precisions): overall, and the worst single image.

    python bench/psnr_dirs.py out-fp32 out-fp16
"""

import glob
import os
import sys

import numpy as np


def psnr(a, b):
    """PSNR in dB of uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float('inf') if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main(dir_a, dir_b):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from training.image_io import read_image # pylint: disable=import-outside-toplevel
    names = sorted(os.path.relpath(p, dir_a) for p in glob.glob(os.path.join(dir_a, '**', '*.png'), recursive=True))
    if not names:
        sys.exit(f'no PNG files in {dir_a}')
    a = np.stack([read_image(os.path.join(dir_a, n)) for n in names])
    b = np.stack([read_image(os.path.join(dir_b, n)) for n in names])
    worst = min(psnr(x, y) for x, y in zip(a, b))
    print(f'{len(names)} images: PSNR {psnr(a, b):.1f} dB overall, {worst:.1f} dB worst image, '
          f'{np.mean(a != b) * 100:.2f}% of pixels differ')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
