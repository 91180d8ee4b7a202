"""Convert an image folder, an image zip, CIFAR-10, MNIST or an LSUN lmdb into
the dataset format that training/dataset.py reads: a zip or a folder of
uncompressed PNGs named 00000/img00000000.png, ... plus dataset.json; or
encode such a dataset into the VAE latents of EDM2's latent models
(00000/img-mean-std-00000000.npy, ...), as EDM2's `dataset_tool.py encode`."""

import contextlib
import functools
import gzip
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from training.dataset import check_class_label, check_label_files, check_png_pixels, check_zip_member_size

try:
    import pyspng
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# Small helpers.

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
MAX_RESOLUTION = 16384 # --resolution, per side

def file_ext(name):
    return os.path.splitext(str(name))[1].lower()

def is_image_ext(fname):
    return file_ext(fname) in PIL.Image.EXTENSION

def parse_resolution(s):
    """Parse 'WxH' (or 'W,H') into a tuple of two positive ints."""
    m = re.match(r'^\s*(\d+)\s*[x,]\s*(\d+)\s*$', str(s))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f'--resolution must be WxH with positive integers, e.g. 512x512; got {s!r}')
    if int(m.group(1)) > MAX_RESOLUTION or int(m.group(2)) > MAX_RESOLUTION:
        raise ValueError(f'--resolution {s} is too large: at most {MAX_RESOLUTION} pixels per side')
    return int(m.group(1)), int(m.group(2))

def maybe_min(a, b):
    return a if b is None else min(a, b)

def decode_image(data, name):
    """Decode image file bytes into an 8-bit HWC (RGB) or HW (grayscale) array; ValueError naming `name` otherwise."""
    check_png_pixels(data, name) # Pillow's limit, also for pyspng, which has none
    if pyspng is not None and data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] in (0, 2):
        try:
            img = pyspng.load(data) # 8-bit grayscale or RGB PNG
        except RuntimeError as err:
            raise ValueError(f'{name}: not a readable image ({err})') from None
    else:
        try:
            with PIL.Image.open(io.BytesIO(data)) as pil_img:
                if pil_img.mode == 'P':
                    pil_img = pil_img.convert('RGBA' if 'transparency' in pil_img.info else 'RGB')
                elif pil_img.mode == '1':
                    pil_img = pil_img.convert('L')
                elif pil_img.mode in ('CMYK', 'YCbCr', 'LAB', 'HSV'): # (a few ImageNet JPEGs are CMYK)
                    pil_img = pil_img.convert('RGB')
                img = np.array(pil_img)
        except PIL.UnidentifiedImageError:
            raise ValueError(f'{name}: not a readable image (unknown format or corrupt file)') from None
        except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as err:
            raise ValueError(f'{name}: not a readable image ({type(err).__name__}: {err})') from None
    if img.dtype != np.uint8:
        raise ValueError(f'{name}: {img.dtype} pixels; images must be 8-bit RGB or grayscale')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img

def encode_png(img):
    """PNG bytes of an HW (grayscale) or HWC (RGB) uint8 array, uncompressed (compression level 0)."""
    with io.BytesIO() as f:
        PIL.Image.fromarray(img, 'L' if img.ndim == 2 else 'RGB').save(f, format='png', compress_level=0, optimize=False)
        return f.getvalue()

#----------------------------------------------------------------------------
# Sources. Each open_*() checks what it can up front and returns
# (number of images or None, iterator of dict(img=HWC/HW uint8, label=int/None, name=str)).
# The iterators decode one image at a time.

def _sort_key(rel_path):
    return rel_path.split('/') # path order: component by component

def open_image_folder(source_dir, *, max_images):
    fnames = []
    for root, _dirs, files in os.walk(source_dir):
        for fname in files:
            if is_image_ext(fname):
                fnames.append(os.path.relpath(os.path.join(root, fname), source_dir).replace('\\', '/'))
    if len(fnames) == 0:
        raise ValueError(f'no image files found in {source_dir}')
    fnames.sort(key=_sort_key)
    max_idx = maybe_min(len(fnames), max_images)

    # Labels from dataset.json, else from the top-level folder names.
    labels = None
    meta_fname = os.path.join(source_dir, 'dataset.json')
    if os.path.lexists(meta_fname):
        dnnlib.util.check_regular_file(meta_fname)
        with open(meta_fname, 'rb') as f:
            labels = _parse_labels(f.read(), meta_fname, fnames)
    if labels is None: # no dataset.json, or one with "labels": null
        toplevel_names = {fname: fname.split('/')[0] if '/' in fname else '' for fname in fnames}
        toplevel_indices = {name: idx for idx, name in enumerate(sorted(set(toplevel_names.values())))}
        if len(toplevel_indices) > 1:
            labels = {fname: toplevel_indices[name] for fname, name in toplevel_names.items()}

    def iterate_images():
        for fname in fnames[:max_idx]:
            path = os.path.join(source_dir, fname)
            dnnlib.util.check_regular_file(path)
            try:
                with open(path, 'rb') as f:
                    data = f.read()
            except OSError as err:
                raise ValueError(f'{path}: cannot read ({err.strerror or err})') from None
            yield dict(img=decode_image(data, path), label=(labels or {}).get(fname), name=path)
    return max_idx, iterate_images()

def open_image_zip(source, *, max_images):
    try:
        with zipfile.ZipFile(source, mode='r') as z:
            fnames = sorted(fname for fname in z.namelist() if is_image_ext(fname))
            labels = None
            if 'dataset.json' in z.namelist():
                check_zip_member_size(z, 'dataset.json', f'{source}:dataset.json')
                labels = _parse_labels(z.read('dataset.json'), f'{source}:dataset.json', fnames)
    except zipfile.BadZipFile as err:
        raise ValueError(f'{source} is not a readable zip file ({err})') from None
    if len(fnames) == 0:
        raise ValueError(f'no image files found in {source}')
    max_idx = maybe_min(len(fnames), max_images)

    def iterate_images():
        with zipfile.ZipFile(source, mode='r') as z:
            for fname in fnames[:max_idx]:
                name = f'{source}:{fname}'
                check_zip_member_size(z, fname, name)
                try:
                    data = z.read(fname)
                except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as err:
                    raise ValueError(f'{name}: cannot read ({err})') from None
                yield dict(img=decode_image(data, name), label=(labels or {}).get(fname), name=name)
    return max_idx, iterate_images()

def _parse_labels(data, where, fnames):
    """{file name: class id} of a dataset.json that labels each of `fnames`, or None for "labels": null."""
    try:
        labels = json.loads(data)['labels']
        labels = None if labels is None else {fname: label for fname, label in labels}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f'{where} is not a valid dataset.json ({type(err).__name__}: {err})') from None
    if labels is not None:
        check_label_files(labels, fnames, where)
        for fname in fnames:
            check_class_label(labels[fname], f'{where}, {fname}')
    return labels

def open_lmdb(lmdb_dir, *, max_images):
    try:
        import lmdb
    except ImportError:
        raise ValueError(f'{lmdb_dir}: reading an LSUN lmdb folder needs the lmdb package (pip install lmdb)') from None
    try:
        env = lmdb.open(lmdb_dir, readonly=True, lock=False, readahead=False, subdir=True)
        with env.begin(write=False) as txn:
            num_entries = txn.stat()['entries']
    except lmdb.Error as err:
        raise ValueError(f'{lmdb_dir} is not a readable lmdb database ({err})') from None
    max_idx = maybe_min(num_entries, max_images)

    def iterate_images():
        try:
            with env.begin(write=False) as txn:
                for idx, (key, value) in enumerate(txn.cursor()):
                    if idx >= max_idx:
                        break
                    name = f'{lmdb_dir}:{key.decode(errors="replace")}'
                    try:
                        with PIL.Image.open(io.BytesIO(value)) as pil_img:
                            img = np.array(pil_img.convert('RGB'))
                    except (OSError, ValueError, SyntaxError, EOFError) as err:
                        tqdm.write(f'Skipping {name}: not a readable image ({err})', file=sys.stderr)
                        continue
                    yield dict(img=img, label=None, name=name)
        finally:
            env.close()
    return max_idx, iterate_images()

class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python values only: all that a CIFAR-10 batch holds."""
    _allowed = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
    }

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        return super().find_class(module, name)

def open_cifar10(tarball, *, max_images):
    members = [f'cifar-10-batches-py/data_batch_{batch}' for batch in range(1, 6)]
    # Decompress once into an unnamed temporary file: the batches are read out of archive order,
    # and seeking backwards in a .gz stream would decompress it again from the start.
    plain = tempfile.TemporaryFile()
    try:
        with gzip.open(tarball, 'rb') as f:
            shutil.copyfileobj(f, plain, 1 << 20)
        plain.seek(0)
        tar = tarfile.open(fileobj=plain, mode='r:')
        names = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        plain.close()
        raise ValueError(f'{tarball} is not a readable .tar.gz file ({err})') from None
    missing = [member for member in members if member not in names]
    if len(missing) > 0:
        plain.close()
        raise ValueError(f'{tarball} has no {missing[0]}; expected the five CIFAR-10 python batches {members[0]} ... {members[-1]}')

    def load_batch(member):
        where = f'{tarball}:{member}'
        try:
            with tar.extractfile(member) as f:
                data = _ArrayUnpickler(f, encoding='latin1').load()
        except (pickle.UnpicklingError, tarfile.TarError, OSError, EOFError, zlib.error, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f'{where} is not a readable CIFAR-10 batch pickle ({type(err).__name__}: {err})') from None
        if not isinstance(data, dict) or 'data' not in data or 'labels' not in data:
            raise ValueError(f'{where}: expected a dict with "data" and "labels"')
        images = data['data']
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            desc = f'{images.dtype} array of shape {images.shape}' if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f'{where}: "data" must be a uint8 array of shape [N, 3072], got {desc}')
        try:
            labels = np.asarray(data['labels'], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise ValueError(f'{where}: "labels" must be integers ({err})') from None
        if labels.shape != (images.shape[0],):
            raise ValueError(f'{where}: {labels.size} labels for {images.shape[0]} images')
        bad = np.flatnonzero((labels < 0) | (labels >= 10))
        if bad.size > 0:
            raise ValueError(f'{where}: label {labels[bad[0]]} of image {bad[0]} is not a CIFAR-10 class (0 to 9)')
        images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) # NCHW => NHWC
        return images, labels

    def iterate_images():
        idx = 0
        try:
            for member in members:
                if max_images is not None and idx >= max_images:
                    break
                images, labels = load_batch(member)
                for i, (img, label) in enumerate(zip(images, labels)):
                    if max_images is not None and idx >= max_images:
                        break
                    yield dict(img=img, label=int(label), name=f'{tarball}:{member}[{i}]')
                    idx += 1
        finally:
            tar.close()
            plain.close()
    return max_images, iterate_images() # the total is known only after reading every batch

def open_mnist(images_gz, *, max_images):
    labels_gz = os.path.join(os.path.dirname(images_gz), 'train-labels-idx1-ubyte.gz')
    if not os.path.isfile(labels_gz):
        raise ValueError(f'{images_gz}: the labels file {labels_gz} is missing')

    def read_header(f, fname, magic, num_dims):
        header = f.read(4 + 4 * num_dims)
        if len(header) < 4 + 4 * num_dims:
            raise ValueError(f'{fname} is too short for an MNIST header')
        values = struct.unpack(f'>{1 + num_dims}I', header)
        if values[0] != magic:
            raise ValueError(f'{fname} is not an MNIST idx file (magic number {values[0]:#x}, expected {magic:#x})')
        return values[1:]

    try:
        with gzip.open(images_gz, 'rb') as f:
            num_images, rows, cols = read_header(f, images_gz, 0x803, 3) # 16-byte header
        with gzip.open(labels_gz, 'rb') as f:
            num_labels, = read_header(f, labels_gz, 0x801, 1) # 8-byte header
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f'{images_gz} or {labels_gz} is not a readable .gz file ({err})') from None
    if num_images != num_labels:
        raise ValueError(f'{images_gz} holds {num_images} images but {labels_gz} holds {num_labels} labels')
    if num_images == 0:
        raise ValueError(f'no images in {images_gz}')
    if rows == 0 or cols == 0:
        raise ValueError(f'{images_gz}: its header announces {rows}x{cols} images; MNIST images are 28x28')
    max_idx = maybe_min(num_images, max_images)

    def iterate_images():
        try:
            with gzip.open(images_gz, 'rb') as fi, gzip.open(labels_gz, 'rb') as fl:
                fi.read(16)
                fl.read(8)
                for idx in range(max_idx):
                    data = fi.read(rows * cols)
                    label = fl.read(1)
                    if len(data) < rows * cols or len(label) < 1:
                        raise ValueError(f'{images_gz} or {labels_gz} ends after {idx} of the {num_images} images its header announces')
                    if label[0] >= 10:
                        raise ValueError(f'{labels_gz}: label {label[0]} of image {idx} is not an MNIST digit (0 to 9)')
                    img = np.frombuffer(data, dtype=np.uint8).reshape(rows, cols)
                    yield dict(img=np.pad(img, [(2, 2), (2, 2)], 'constant', constant_values=0), label=int(label[0]), name=f'{images_gz}[{idx}]')
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f'{images_gz} or {labels_gz} is not a readable .gz file ({err})') from None
    return max_idx, iterate_images()

def open_dataset(source, *, max_images):
    if os.path.exists(source) and not os.path.isdir(source):
        dnnlib.util.check_regular_file(source)
    if os.path.isdir(source):
        if source.rstrip('/\\').endswith('_lmdb'):
            return open_lmdb(source, max_images=max_images)
        return open_image_folder(source, max_images=max_images)
    if os.path.isfile(source):
        if os.path.basename(source) == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images=max_images)
        if os.path.basename(source) == 'train-images-idx3-ubyte.gz':
            return open_mnist(source, max_images=max_images)
        if file_ext(source) == '.zip':
            return open_image_zip(source, max_images=max_images)
        raise ValueError(f'unknown source type: {source}; expected an image folder, a *_lmdb folder, a .zip of images, '
                         'cifar-10-python.tar.gz or train-images-idx3-ubyte.gz')
    raise ValueError(f'source not found: {source}')

#----------------------------------------------------------------------------
# Transforms: each maps an HWC/HW uint8 array to the output size, or to None
# to skip an image that is too small.

TRANSFORMS = ['center-crop', 'center-crop-wide', 'center-crop-dhariwal']

def _resize(img, width, height):
    return np.array(PIL.Image.fromarray(img).resize((width, height), PIL.Image.LANCZOS))

def scale(width, height, img):
    if width is None or (img.shape[1] == width and img.shape[0] == height):
        return img
    return _resize(img, width, height)

def _rgb(img):
    # The crops give RGB, grayscale included, as the reference's do.
    return img[:, :, np.newaxis].repeat(3, axis=2) if img.ndim == 2 else img

def center_crop(width, height, img):
    crop = min(img.shape[0], img.shape[1])
    img = img[(img.shape[0] - crop) // 2 : (img.shape[0] + crop) // 2, (img.shape[1] - crop) // 2 : (img.shape[1] + crop) // 2]
    return _resize(_rgb(img), width, height)

def center_crop_wide(width, height, img):
    # Largest centred region with the aspect width:height.
    ch, cw = int(np.round(img.shape[1] * height / width)), img.shape[1]
    if ch > img.shape[0]:
        ch, cw = img.shape[0], int(np.round(img.shape[0] * width / height))
    if cw < width or ch < height:
        return None
    img = img[(img.shape[0] - ch) // 2 : (img.shape[0] + ch) // 2, (img.shape[1] - cw) // 2 : (img.shape[1] + cw) // 2]
    img = _resize(_rgb(img), width, height)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = img # middle rows of a black square
    return canvas

def center_crop_dhariwal(size, img):
    # ADM's ImageNet crop (Dhariwal & Nichol 2021), as EDM2 prepares ImageNet: halve by box filtering while the short
    # side is at least twice the size, scale the short side to the size (bicubic), crop the centre; RGB, as EDM2 loads.
    img = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 2 else img # grayscale with alpha
    pil_image = PIL.Image.fromarray(_rgb(img)[:, :, :3])
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=PIL.Image.BOX)
    scale_factor = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale_factor) for x in pil_image.size), resample=PIL.Image.BICUBIC)
    img = np.array(pil_image)
    crop_y, crop_x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[crop_y : crop_y + size, crop_x : crop_x + size]

def make_transform(transform, output_width, output_height):
    if transform is None:
        return functools.partial(scale, output_width, output_height)
    if output_width is None or output_height is None:
        raise ValueError(f'--transform={transform} needs --resolution=WxH')
    if transform == 'center-crop':
        return functools.partial(center_crop, output_width, output_height)
    if transform == 'center-crop-wide':
        if output_height > output_width:
            raise ValueError(f'--transform=center-crop-wide needs W >= H in --resolution, got {output_width}x{output_height}')
        return functools.partial(center_crop_wide, output_width, output_height)
    if transform == 'center-crop-dhariwal':
        if output_width != output_height:
            raise ValueError(f'--transform=center-crop-dhariwal needs W = H in --resolution, got {output_width}x{output_height}')
        return functools.partial(center_crop_dhariwal, output_width)
    raise ValueError(f'unknown --transform {transform!r}; expected {", ".join(TRANSFORMS)}')

#----------------------------------------------------------------------------
# Destination: a zip or a folder that appears only once complete.

def _is_same_or_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

def check_dest(dest, source):
    if dest == '':
        raise ValueError('--dest must not be an empty string')
    if _is_same_or_inside(dest, source):
        raise ValueError(f'--dest {dest} is the same as or inside --source {source}')
    if file_ext(dest) == '.zip':
        if os.path.isdir(dest):
            raise ValueError(f'--dest {dest} is a folder, not a zip file')
    elif os.path.lexists(dest):
        if not os.path.isdir(dest):
            raise ValueError(f'--dest {dest} exists and is not a folder')
        if len(os.listdir(dest)) != 0:
            raise ValueError(f'--dest folder {dest} is not empty')

@contextlib.contextmanager
def open_dest(dest):
    """Yield save_bytes(archive_fname, data); the zip or folder `dest` appears only when the block completes."""
    created = [] # parent folders that this call creates, removed again on error
    parent = os.path.dirname(os.path.abspath(dest))
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        with dnnlib.util.atomic_path(dest) as tmp:
            if file_ext(dest) == '.zip':
                with zipfile.ZipFile(tmp, mode='w', compression=zipfile.ZIP_STORED) as zf:
                    yield zf.writestr
            else:
                os.makedirs(tmp)
                made = set()
                def save_bytes(fname, data):
                    folder = os.path.dirname(fname)
                    if folder not in made:
                        os.makedirs(os.path.join(tmp, folder), exist_ok=True)
                        made.add(folder)
                    with open(os.path.join(tmp, fname), 'wb') as fout:
                        fout.write(data)
                yield save_bytes
                if os.path.isdir(dest):
                    os.rmdir(dest) # empty (checked before); the finished folder takes its place
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise

#----------------------------------------------------------------------------

def check_source_dest(source, dest, max_images):
    """The checks before any work, of convert and encode alike."""
    PIL.Image.init()
    if max_images is not None and max_images < 1:
        raise ValueError(f'--max-images must be at least 1, got {max_images}')
    if not os.path.exists(source):
        raise ValueError(f'source not found: {source}')
    check_dest(dest, source)

def save_labels(save_bytes, labels):
    """dataset.json: [[archive name, label], ...], or null unless every file has a label."""
    metadata = dict(labels=labels if all(x is not None for x in labels) else None)
    save_bytes('dataset.json', json.dumps(metadata).encode('utf-8'))

def _describe(attrs):
    return f'{attrs["width"]}x{attrs["height"]} with {attrs["channels"]} channel(s)'

def convert_dataset(source, dest, max_images=None, transform=None, resolution=None):
    """Convert `source` into the dataset `dest` (.zip or folder); return the number of images written.
    Raises ValueError with a one-line message (naming the file) on bad input, leaving nothing at `dest`."""
    width, height = (None, None) if resolution is None else resolution
    transform_image = make_transform(transform, width, height)
    check_source_dest(source, dest, max_images)
    num_files, input_iter = open_dataset(source, max_images=max_images)

    dataset_attrs = None
    labels = []
    num_skipped = 0
    with open_dest(dest) as save_bytes, tqdm(total=num_files, unit='img') as bar:
        for idx, image in enumerate(input_iter):
            bar.update(1)
            idx_str = f'{idx:08d}'
            archive_fname = f'{idx_str[:5]}/img{idx_str}.png'

            # Apply crop and resize.
            img = transform_image(image['img'])
            if img is None:
                num_skipped += 1
                continue

            # Every image must match the first: square, power of two, RGB or grayscale.
            channels = img.shape[2] if img.ndim == 3 else 1
            cur_image_attrs = dict(width=img.shape[1], height=img.shape[0], channels=channels)
            if dataset_attrs is None:
                dataset_attrs = cur_image_attrs
                if channels not in (1, 3):
                    raise ValueError(f'{image["name"]}: {channels} channels; images must be RGB or grayscale')
                if img.shape[1] != img.shape[0]:
                    raise ValueError(f'{image["name"]}: {img.shape[1]}x{img.shape[0]} after crop and resize; images must be square '
                                     '(use --transform and --resolution)')
                if img.shape[1] & (img.shape[1] - 1) != 0:
                    raise ValueError(f'{image["name"]}: {img.shape[1]}x{img.shape[0]} after crop and resize; the size must be a power of two '
                                     '(use --resolution)')
            elif cur_image_attrs != dataset_attrs:
                raise ValueError(f'{image["name"]}: {_describe(cur_image_attrs)} after crop and resize, but the first image is '
                                 f'{_describe(dataset_attrs)}; all images must have one size and channel count (use --resolution)')

            save_bytes(archive_fname, encode_png(img))
            labels.append([archive_fname, image['label']] if image['label'] is not None else None)

        if dataset_attrs is None:
            raise ValueError(f'no images written: all {num_skipped} images are smaller than --resolution {width}x{height}'
                             if num_skipped else f'no images found in {source}')
        save_labels(save_bytes, labels)
    if num_skipped:
        print(f'Skipped {num_skipped} images smaller than {width}x{height}.')
    return len(labels)

def encode_dataset(source, dest, model_url='stabilityai/sd-vae-ft-mse', max_images=None, device=None):
    """Encode the images of `source` (any source that convert reads, usually a converted dataset) into the VAE latents
    of EDM2's latent models: `dest` (.zip or folder) of 00000/img-mean-std-00000000.npy, each float32 [8, H/8, W/8],
    the mean and standard deviation of the 4 latent channels; plus dataset.json. Returns the number of images."""
    import torch # pylint: disable=import-outside-toplevel
    from torch_utils import misc # pylint: disable=import-outside-toplevel
    from training.encoders import StabilityVAEEncoder # pylint: disable=import-outside-toplevel
    check_source_dest(source, dest, max_images)
    device = misc.choose_device(device)
    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=1)
    vae.init(device) # the VAE's errors (no diffusers, no weights) before any work
    num_files, input_iter = open_dataset(source, max_images=max_images)
    labels = []
    with open_dest(dest) as save_bytes, tqdm(total=num_files, unit='img') as bar:
        for idx, image in enumerate(input_iter):
            bar.update(1)
            img = _rgb(image['img'])
            if img.shape[2] != 3:
                raise ValueError(f'{image["name"]}: {img.shape[2]} channels; the VAE encodes RGB or grayscale images')
            with torch.no_grad():
                mean_std = vae.encode_pixels(torch.from_numpy(img).to(device).permute(2, 0, 1).unsqueeze(0))[0].cpu()
            idx_str = f'{idx:08d}'
            archive_fname = f'{idx_str[:5]}/img-mean-std-{idx_str}.npy'
            buf = io.BytesIO()
            np.save(buf, mean_std.numpy())
            save_bytes(archive_fname, buf.getvalue())
            labels.append([archive_fname, image['label']] if image['label'] is not None else None)
        if not labels:
            raise ValueError(f'no images found in {source}')
        save_labels(save_bytes, labels)
    return len(labels)

#----------------------------------------------------------------------------

@click.command()
@click.option('--source',     help='Input folder, *_lmdb folder or archive', required=True, metavar='PATH')
@click.option('--dest',       help='Output .zip file or (empty) folder', required=True, metavar='PATH')
@click.option('--max-images', help='Convert at most this many images', type=int, default=None, metavar='INT')
@click.option('--transform',  help='Crop/resize mode', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output resolution, e.g. 512x512', metavar='WxH')
def main(source, dest, max_images, transform, resolution):
    """Convert an image dataset into the zip or folder format used for training.

    \b
    Sources (by name):
      folder of images          recursive; labels from dataset.json, else one class per top-level folder
      *.zip                     zip of images, labels from dataset.json inside it
      *_lmdb folder             LSUN (needs the lmdb package)
      cifar-10-python.tar.gz    CIFAR-10, with class labels
      train-images-idx3-ubyte.gz
                                MNIST (with train-labels-idx1-ubyte.gz beside it), padded to 32x32

    \b
    Examples:
      python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
          --dest=datasets/cifar10-32x32.zip
      python dataset_tool.py --source=downloads/ffhq/images1024x1024 \\
          --dest=datasets/ffhq-64x64.zip --resolution=64x64
      python dataset_tool.py --source=downloads/afhqv2 \\
          --dest=datasets/afhqv2-64x64.zip --resolution=64x64 --transform=center-crop

    \b
    EDM2's command forms work too: `dataset_tool.py convert` is this command,
    and `dataset_tool.py encode` writes the VAE latents of a dataset (--help):
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """
    try:
        convert_dataset(source=source, dest=dest, max_images=max_images, transform=transform,
                        resolution=None if resolution is None else parse_resolution(resolution))
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None

#----------------------------------------------------------------------------

@click.command()
@click.option('--model-url',  help='The VAE: a diffusers model name or a local folder', metavar='NAME', default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source',     help='Input dataset (folder or zip of images)', required=True, metavar='PATH')
@click.option('--dest',       help='Output .zip file or (empty) folder', required=True, metavar='PATH')
@click.option('--max-images', help='Encode at most this many images', type=int, default=None, metavar='INT')
@click.option('--device',     help='Device  [default: cuda when available, else cpu]', metavar='STR', default=None)
def encode(model_url, source, dest, max_images, device):
    """Encode a dataset into the VAE latents of EDM2's latent models (needs diffusers and the VAE's safetensors weights).

    \b
    Example (EDM2's ImageNet-512):
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """
    try:
        encode_dataset(source=source, dest=dest, model_url=model_url, max_images=max_images, device=device)
    except (ValueError, OSError, ImportError) as err:
        raise click.ClickException(str(err)) from None

COMMANDS = dict(convert=main, encode=encode) # EDM2's subcommands; without one, the reference's command line

#----------------------------------------------------------------------------

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        name = sys.argv[1]
        COMMANDS[name](args=sys.argv[2:], prog_name=f'{os.path.basename(sys.argv[0])} {name}') # pylint: disable=no-value-for-parameter
    else:
        main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
