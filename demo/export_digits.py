"""Export the handwritten digits bundled with scikit-learn (1,797 real 8x8
grayscale images, 10 classes) to an image folder with dataset.json labels.

    python demo/export_digits.py --dest=datasets/digits-8x8
    python dataset_tool.py --source=datasets/digits-8x8 --dest=datasets/digits-16x16.zip --resolution=16x16

scikit-learn is needed by this script only, not by the rest of the project.
"""

import json
import os
import sys

import click
import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dnnlib.util import atomic_path # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def load_digits_uint8():
    """The scikit-learn digits as uint8 images [N, 8, 8] (0..16 mapped to 0..255) and int labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise click.ClickException('demo/export_digits.py needs scikit-learn (pip install scikit-learn)') from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)

#----------------------------------------------------------------------------

@click.command()
@click.option('--dest', help='Output folder (created; must not exist)', metavar='DIR', type=str, required=True)
def main(dest):
    """Write digit images as img{i:05d}.png plus dataset.json with their classes."""
    if os.path.exists(dest):
        raise click.ClickException(f'--dest {dest} already exists')
    images, labels = load_digits_uint8()
    with atomic_path(dest) as tmp:
        os.makedirs(tmp)
        entries = []
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f'img{i:05d}.png'
            PIL.Image.fromarray(image, 'L').save(os.path.join(tmp, name))
            entries.append([name, int(label)])
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    print(f'Wrote {len(images)} digits to {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
