"""Image datasets stored as a folder or an uncompressed zip of PNG images
(the format that dataset_tool.py writes), with optional class labels."""

import io
import json
import math
import numbers
import os
import struct
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

try:
    import pyspng
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# Checks of untrusted input, shared with dataset_tool.py.

MAX_CLASSES     = 100000    # Class ids are below this (one-hot labels of MAX_CLASSES floats per image).
MAX_FILE_BYTES  = 1 << 30   # Largest zip member read (a 16384x16384 RGB PNG stored uncompressed is 768 MiB).
_PNG_SIGNATURE  = b'\x89PNG\r\n\x1a\n'

def check_class_label(label, where):
    """Raise ValueError unless `label` is an integer class id 0 <= label < MAX_CLASSES (not a bool, not a float such as 3.0)."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Integral) or not 0 <= label < MAX_CLASSES:
        raise ValueError(f'{where}: label {json.dumps(label) if isinstance(label, (str, bool, int, float, type(None))) else repr(label)} '
                         f'is not a class id (an integer from 0 to {MAX_CLASSES - 1})')

def check_label_files(labels, fnames, where):
    """Raise ValueError unless the file names that the labels of `where` name are exactly `fnames`."""
    known = set(fnames)
    extra = [fname for fname in labels if fname not in known]
    if len(extra) > 0:
        raise ValueError(f'{where} labels {extra[0]}, which is not one of its images ({len(extra)} such labels)')
    missing = [fname for fname in fnames if fname not in labels]
    if len(missing) > 0:
        raise ValueError(f'{where} has no label for {missing[0]} ({len(missing)} of {len(fnames)} images lack one)')

def check_png_pixels(data, name):
    """Raise ValueError if the PNG header of `data` announces more pixels than Pillow decodes
    (2 * PIL.Image.MAX_IMAGE_PIXELS, its DecompressionBombError limit); other data passes."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is None or len(data) < 24 or data[:8] != _PNG_SIGNATURE:
        return
    width, height = struct.unpack('>II', data[16:24]) # IHDR, the first chunk
    if width * height > 2 * limit:
        raise ValueError(f'{name}: {width}x{height} pixels, more than the {2 * limit} that Pillow decodes '
                         f'(2 * PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)')

def check_zip_member_size(zip_file, fname, name):
    """Raise ValueError if the member `fname` of an open ZipFile is larger than MAX_FILE_BYTES uncompressed."""
    size = zip_file.getinfo(fname).file_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f'{name}: {size} bytes uncompressed, more than the {MAX_FILE_BYTES >> 20} MiB read from one file')

#----------------------------------------------------------------------------
# Abstract base class for datasets.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data (NCHW).
        max_size    = None,     # Keep a random subset of this many images, None = all. Applied before xflip.
        use_labels  = False,    # Enable conditioning labels? False = label dimension is zero.
        xflip       = False,    # Double the size of the dataset with mirrored copies. Applied after max_size.
        random_seed = 0,        # Random seed for choosing the max_size subset.
        cache       = False,    # Keep decoded images in CPU memory?
    ):
        if max_size is not None and max_size < 0:
            raise ValueError(f'max_size must be non-negative, got {max_size}')
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict() # {raw_idx: np.ndarray, ...}
        self._raw_labels = None
        self._label_shape = None

        # Apply max_size: a shuffle with a fixed seed, first max_size indices, in sorted order.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if (max_size is not None) and (self._raw_idx.size > max_size):
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # Apply xflip: the second half holds mirrored copies of the first.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            raw_labels = self._load_raw_labels() if self._use_labels else None
            if raw_labels is None:
                raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            if not isinstance(raw_labels, np.ndarray) or raw_labels.shape[0] != self._raw_shape[0]:
                raise ValueError(f'dataset {self._name}: expected {self._raw_shape[0]} labels, one per image')
            if raw_labels.dtype not in (np.float32, np.int64):
                raise ValueError(f'dataset {self._name}: labels must be int64 class ids or float32 vectors, got {raw_labels.dtype}')
            if raw_labels.dtype == np.int64:
                if raw_labels.ndim != 1:
                    raise ValueError(f'dataset {self._name}: integer labels must be one class id per image')
                if raw_labels.size > 0 and raw_labels.min() < 0:
                    raise ValueError(f'dataset {self._name}: class ids must be non-negative, got {raw_labels.min()}')
                if raw_labels.size > 0 and raw_labels.max() >= MAX_CLASSES:
                    raise ValueError(f'dataset {self._name}: class id {raw_labels.max()} is too large (at most {MAX_CLASSES - 1})')
            self._raw_labels = raw_labels
        return self._raw_labels

    def close(self): # to be overridden by subclass
        pass

    def _load_raw_image(self, raw_idx): # to be overridden by subclass
        raise NotImplementedError

    def _load_raw_labels(self): # to be overridden by subclass
        raise NotImplementedError

    def _image_name(self, raw_idx): # for error messages; to be overridden by subclass
        return f'image {raw_idx} of dataset {self._name}'

    def __getstate__(self):
        return dict(self.__dict__)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx, None)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.float32): # pixels, or latents
            raise ValueError(f'{self._image_name(raw_idx)}: expected 8-bit pixels or float32 latents')
        if list(image.shape) != self.image_shape:
            raise ValueError(f'{self._image_name(raw_idx)}: image shape (CHW) is {list(image.shape)}, '
                             f'but the dataset\'s first image is {self.image_shape}; all images must have one shape')
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx):
        d = dnnlib.EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = (int(self._xflip[idx]) != 0)
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        if len(self.image_shape) != 3 or self.image_shape[1] != self.image_shape[2]:
            raise ValueError(f'dataset {self._name}: images are not square ({self.image_shape}), so it has no single resolution')
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        if len(self.label_shape) != 1:
            raise ValueError(f'dataset {self._name}: labels of shape {self.label_shape} have no single dimension')
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------
# Dataset subclass that loads images recursively from the specified directory
# or ZIP file.

def _file_ext(fname):
    return os.path.splitext(fname)[1].lower()

def _decode_image(data, ext, use_pyspng):
    """Decode image file bytes into an HWC or HW uint8 array."""
    # pyspng for 8-bit gray, RGB and RGBA PNGs (bit depth at byte 24, colour type at 25); palettes and gray + alpha
    # decode through Pillow, which expands transparent palettes to RGBA.
    if use_pyspng and pyspng is not None and ext == '.png' and len(data) > 25 and data[24] == 8 and data[25] in (0, 2, 6):
        return pyspng.load(data)
    with PIL.Image.open(io.BytesIO(data)) as img:
        if img.mode == 'P':
            img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
        elif img.mode == '1':
            img = img.convert('L')
        return np.array(img)

def _decode_latents(data, where):
    """A float32 [C, H, W] array from the bytes of a .npy file of floats, as EDM2's dataset_tool.py encode writes
    them ([mean, std] of the VAE's latent distribution); never unpickles objects."""
    try:
        latents = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f'{where}: not a readable .npy array ({type(err).__name__}: {err})') from None
    if latents.dtype.kind != 'f' or latents.ndim < 2 or latents.size == 0:
        raise ValueError(f'{where}: latents must be a non-empty float array of at least 2 dimensions, got {latents.dtype} {list(latents.shape)}')
    latents = latents.reshape(-1, *latents.shape[-2:]).astype(np.float32)
    if not np.isfinite(latents).all():
        raise ValueError(f'{where}: the latents are not all finite')
    return latents

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Path to directory or zip.
        resolution      = None, # Ensure specific resolution, None = anything goes.
        use_pyspng      = True, # Use pyspng for PNG files when it is installed?
        **super_kwargs,         # Additional arguments for the Dataset base class.
    ):
        self._path = path
        self._use_pyspng = use_pyspng
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path)
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif not os.path.exists(self._path):
            raise ValueError(f'dataset not found: {self._path}')
        elif _file_ext(self._path) == '.zip':
            dnnlib.util.check_regular_file(self._path)
            self._type = 'zip'
            self._all_fnames = set(self._get_zipfile().namelist())
        else:
            raise ValueError(f'dataset must be a folder or a .zip file: {self._path}')

        PIL.Image.init()
        self._image_fnames = sorted(fname for fname in self._all_fnames if _file_ext(fname) in PIL.Image.EXTENSION)
        latent_fnames = sorted(fname for fname in self._all_fnames if _file_ext(fname) == '.npy') # EDM2's VAE latents
        if self._image_fnames and latent_fnames:
            raise ValueError(f'{self._path} holds both images and .npy latents; a dataset holds one kind')
        self._image_fnames = self._image_fnames or latent_fnames
        if len(self._image_fnames) == 0:
            raise ValueError(f'no image files found in {self._path}')

        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        raw_shape = [len(self._image_fnames)] + list(self._load_raw_image(0).shape)
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise ValueError(f'{self._path}: images are {raw_shape[3]}x{raw_shape[2]}, but resolution {resolution} was requested')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _get_zipfile(self):
        # Opened lazily, once per process: a handle inherited through fork would share its file offset.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except zipfile.BadZipFile as err:
                raise ValueError(f'{self._path} is not a readable zip file ({err})') from None
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        """Open a regular file of the folder, or a zip member of at most MAX_FILE_BYTES, for reading."""
        if self._type == 'dir':
            path = os.path.join(self._path, fname)
            dnnlib.util.check_regular_file(path)
            return open(path, 'rb')
        check_zip_member_size(self._get_zipfile(), fname, os.path.join(self._path, fname))
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        try:
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._zipfile = None
            self._zipfile_pid = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _image_name(self, raw_idx):
        return os.path.join(self._path, self._image_fnames[raw_idx])

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                data = f.read()
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f'{self._image_name(raw_idx)}: cannot read ({type(err).__name__}: {err})') from None
        if _file_ext(fname) == '.npy':
            return _decode_latents(data, self._image_name(raw_idx))
        check_png_pixels(data, self._image_name(raw_idx)) # Pillow's limit, also for pyspng, which has none
        try:
            image = _decode_image(data, _file_ext(fname), self._use_pyspng)
        except PIL.UnidentifiedImageError:
            raise ValueError(f'{self._image_name(raw_idx)}: not a readable image (unknown format or corrupt file)') from None
        except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as err:
            raise ValueError(f'{self._image_name(raw_idx)}: not a readable image ({type(err).__name__}: {err})') from None
        if image.dtype != np.uint8:
            raise ValueError(f'{self._image_name(raw_idx)}: {image.dtype} pixels; only 8-bit images are supported')
        if image.ndim == 2:
            image = image[:, :, np.newaxis] # HW => HWC
        return image.transpose(2, 0, 1) # HWC => CHW

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        where = os.path.join(self._path, fname)
        try:
            with self._open_file(fname) as f:
                labels = json.load(f)['labels']
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f'{where} is not a valid dataset.json ({type(err).__name__}: {err})') from None
        if labels is None:
            return None
        try:
            labels = dict(labels)
        except (TypeError, ValueError):
            raise ValueError(f'{where}: "labels" must be a list of [file name, label] pairs or null') from None
        keys = [fname.replace('\\', '/') for fname in self._image_fnames]
        check_label_files(labels, keys, where)
        if not any(isinstance(labels[key], list) for key in keys): # class ids
            for key in keys:
                check_class_label(labels[key], f'{where}, {key}')
            return np.array([labels[key] for key in keys], dtype=np.int64)
        try:
            labels = np.array([labels[key] for key in keys])
        except ValueError:
            raise ValueError(f'{where}: labels must all have the same shape') from None
        if labels.ndim != 2 or labels.dtype.kind not in 'iuf' or not np.isfinite(labels).all():
            raise ValueError(f'{where}: labels must be integer class ids or vectors of finite numbers')
        return labels.astype(np.float32)

#----------------------------------------------------------------------------
