"""dataset_tool.py as a user runs it: every source kind converts pixel-exact,
the transforms match PIL, and bad input gives a one-line error and no output."""

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest

from conftest import ROOT, make_tiny_vae, run_script, subprocess_env

#----------------------------------------------------------------------------
# Helpers: inputs in the real formats, outputs decoded with PIL.

def archive_name(i):
    return f'{i:08d}'[:5] + f'/img{i:08d}.png'

def png_bytes(img):
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format='png')
    return buf.getvalue()

def write_image(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(img).save(path)

def random_image(rng, width, height, channels=3):
    shape = [height, width] if channels == 1 else [height, width, channels]
    return rng.integers(0, 256, shape, dtype=np.uint8)

def write_cifar10(path, sizes, rng, drop_batch=None, data_shape=None):
    """cifar-10-python.tar.gz: five data_batch_N pickles (protocol 2, latin1 keys) plus the other members."""
    images, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, payload):
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        add('readme.html', b'<html></html>')
        add('batches.meta', pickle.dumps(dict(label_names=['airplane'] * 10, num_vis=3072), protocol=2))
        for batch, n in enumerate(sizes, start=1):
            data = rng.integers(0, 256, data_shape or [n, 3072], dtype=np.uint8)
            batch_labels = rng.integers(0, 10, n).tolist()
            if batch != drop_batch:
                add(f'data_batch_{batch}', pickle.dumps(dict(batch_label=f'training batch {batch} of 5', labels=batch_labels,
                                                             data=data, filenames=[f'f{i}.png' for i in range(n)]), protocol=2))
            if data_shape is None:
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch_labels
        add('test_batch', pickle.dumps(dict(labels=[1], data=np.zeros([1, 3072], np.uint8)), protocol=2))
    return (np.concatenate(images) if images else None), labels

def write_mnist(folder, n, rng, num_stored=None):
    images = rng.integers(0, 256, [n, 28, 28], dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    stored = n if num_stored is None else num_stored
    with gzip.open(os.path.join(folder, 'train-images-idx3-ubyte.gz'), 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, n, 28, 28) + images[:stored].tobytes())
    with gzip.open(os.path.join(folder, 'train-labels-idx1-ubyte.gz'), 'wb') as f:
        f.write(struct.pack('>II', 0x801, n) + labels[:stored].tobytes())
    return images, labels

def read_dataset(path):
    """{archive name: array} and the dataset.json labels of a zip or folder, decoded with PIL."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
            files = {name: z.read(name) for name in z.namelist()}
    else:
        files = {}
        for root, _dirs, fnames in os.walk(path):
            for fname in fnames:
                with open(os.path.join(root, fname), 'rb') as f:
                    files[os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')] = f.read()
    labels = json.loads(files.pop('dataset.json'))['labels']
    images = {}
    for name, data in files.items():
        img = np.array(PIL.Image.open(io.BytesIO(data)))
        assert len(data) >= img.size + img.shape[0] # compression level 0: no smaller than the raw rows
        images[name] = img
    return images, labels

def run_tool(*args, check=True, env=None):
    return run_script(['dataset_tool.py'] + [str(a) for a in args], check=check, env=env)

def leftovers(folder):
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files if '.tmp-' in name]

#----------------------------------------------------------------------------
# Sources.

def test_cifar10_archive_converts_with_its_labels(tmp_path):
    source = tmp_path / 'cifar-10-python.tar.gz'
    images, labels = write_cifar10(source, [3, 1, 2, 4, 2], np.random.default_rng(0))
    run_tool('--source', source, '--dest', tmp_path / 'cifar.zip')
    out, out_labels = read_dataset(tmp_path / 'cifar.zip')
    names = [archive_name(i) for i in range(len(images))]
    assert sorted(out) == names
    for i, name in enumerate(names):
        np.testing.assert_array_equal(out[name], images[i])
    assert out_labels == [[name, label] for name, label in zip(names, labels)]

    # --max-images stops inside the second batch.
    run_tool('--source', source, '--dest', tmp_path / 'cifar4.zip', '--max-images', 4)
    out, out_labels = read_dataset(tmp_path / 'cifar4.zip')
    assert sorted(out) == names[:4] and out_labels == [[name, label] for name, label in zip(names[:4], labels[:4])]

def test_mnist_padded_to_32x32(tmp_path):
    images, labels = write_mnist(tmp_path, 5, np.random.default_rng(1))
    run_tool('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'mnist')
    out, out_labels = read_dataset(tmp_path / 'mnist')
    names = [archive_name(i) for i in range(5)]
    assert sorted(out) == names
    for i, name in enumerate(names):
        assert out[name].shape == (32, 32)
        np.testing.assert_array_equal(out[name], np.pad(images[i], 2))
    assert out_labels == [[name, int(label)] for name, label in zip(names, labels)]

def test_folder_labels_from_top_level_folders(tmp_path):
    rng = np.random.default_rng(2)
    rel_paths = ['dog/c.png', 'cat/b.png', 'bird/x/d.png', 'cat/a.png', 'cat/notes.txt']
    sources = {p: random_image(rng, 8, 8) for p in rel_paths if p.endswith('.png')}
    for p, img in sources.items():
        write_image(tmp_path / 'src' / p, img)
    (tmp_path / 'src' / 'cat' / 'notes.txt').write_text('not an image')
    run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip')
    out, labels = read_dataset(tmp_path / 'out.zip')
    order = ['bird/x/d.png', 'cat/a.png', 'cat/b.png', 'dog/c.png'] # sorted paths; classes bird=0, cat=1, dog=2
    assert sorted(out) == [archive_name(i) for i in range(4)]
    for i, p in enumerate(order):
        np.testing.assert_array_equal(out[archive_name(i)], sources[p])
    assert labels == [[archive_name(0), 0], [archive_name(1), 1], [archive_name(2), 1], [archive_name(3), 2]]

    # All images in one top-level folder: no labels.
    for p, img in sources.items():
        write_image(tmp_path / 'one' / 'all' / p.replace('/', '_'), img)
    run_tool('--source', tmp_path / 'one', '--dest', tmp_path / 'one.zip')
    assert read_dataset(tmp_path / 'one.zip')[1] is None

    # A dataset.json without labels: the folder names give them, as when it is absent.
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps(dict(labels=None)))
    run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'null.zip')
    assert read_dataset(tmp_path / 'null.zip')[1] == labels

def test_zip_source_with_dataset_json(tmp_path):
    rng = np.random.default_rng(3)
    sources = {f'img{i}.png': random_image(rng, 4, 4, channels=1) for i in range(3)}
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        for name, img in sources.items():
            z.writestr(name, png_bytes(img))
        z.writestr('dataset.json', json.dumps(dict(labels=[[name, 7 - i] for i, name in enumerate(sources)])))
    run_tool('--source', tmp_path / 'src.zip', '--dest', tmp_path / 'out')
    out, labels = read_dataset(tmp_path / 'out')
    for i, img in enumerate(sources.values()):
        np.testing.assert_array_equal(out[archive_name(i)], img)
    assert labels == [[archive_name(i), 7 - i] for i in range(3)]

def test_folder_with_partial_dataset_json_is_an_error(tmp_path):
    # A dataset.json that labels only some images names the first image without a label, rather than writing labels: null.
    rng = np.random.default_rng(4)
    for name in ['a.png', 'b.png']:
        write_image(tmp_path / 'src' / name, random_image(rng, 4, 4))
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps(dict(labels=[['a.png', 1]])))
    res = run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr
    assert f'Error: {tmp_path / "src" / "dataset.json"} has no label for b.png (1 of 2 images lack one)' in res.stderr
    assert not os.path.exists(tmp_path / 'out.zip')

def test_lsun_lmdb_converts_rgb_and_gray_images(tmp_path):
    import lmdb # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(5)
    rgb, gray = random_image(rng, 8, 8), random_image(rng, 8, 8, channels=1)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format='webp', lossless=True)
    values = [buf.getvalue(), b'corrupt', png_bytes(gray)]
    env = lmdb.open(str(tmp_path / 'bedroom_train_lmdb'), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f'key{i}'.encode(), value)
    env.close()
    run_tool('--source', tmp_path / 'bedroom_train_lmdb', '--dest', tmp_path / 'lsun.zip')
    out, labels = read_dataset(tmp_path / 'lsun.zip')
    # The unreadable entry is skipped (LSUN has a few); grayscale becomes RGB.
    assert sorted(out) == [archive_name(0), archive_name(1)] and labels is None
    np.testing.assert_array_equal(out[archive_name(0)], rgb)
    np.testing.assert_array_equal(out[archive_name(1)], np.stack([gray] * 3, axis=2))

def test_lsun_without_lmdb_says_so(tmp_path):
    (tmp_path / 'shadow').mkdir()
    (tmp_path / 'shadow' / 'lmdb.py').write_text("raise ImportError('No module named lmdb')\n") # as if not installed
    (tmp_path / 'church_outdoor_train_lmdb').mkdir()
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path / 'shadow'), ROOT]))
    res = run_tool('--source', tmp_path / 'church_outdoor_train_lmdb', '--dest', tmp_path / 'out.zip', check=False, env=env)
    assert_clean_failure(res, 'needs the lmdb package', tmp_path, tmp_path / 'out.zip')

#----------------------------------------------------------------------------
# Transforms.

def reference_center_crop_wide(img, width, height):
    """The reference's center-crop-wide: round(width h / w) rows of a w x h image, resized to width x height."""
    ch = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or ch < height:
        return None
    img = img[(img.shape[0] - ch) // 2 : (img.shape[0] + ch) // 2]
    if img.ndim == 2:
        img = img[:, :, np.newaxis].repeat(3, axis=2)
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2, :] = np.array(PIL.Image.fromarray(img, 'RGB').resize((width, height), PIL.Image.LANCZOS))
    return canvas

def expected_transform(img, transform, width, height):
    """The transform spelled out with PIL crop boxes."""
    pil = PIL.Image.fromarray(img)
    w, h = pil.size
    if transform is None:
        return np.array(pil.resize((width, height), PIL.Image.LANCZOS))
    pil = pil.convert('RGB') # The crops give RGB, grayscale included (R = G = B), as the reference's.
    img = np.array(pil)
    if transform == 'center-crop':
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.array(pil.crop(box).resize((width, height), PIL.Image.LANCZOS))
    cw, ch = w, round(w * height / width) # largest centred width:height region
    if ch > h:
        cw, ch = round(h * width / height), h
    if cw < width or ch < height:
        return None
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    canvas = np.zeros([width, width] + list(img.shape[2:]), dtype=np.uint8)
    canvas[(width - height) // 2 : (width - height) // 2 + height] = np.array(pil.crop(box).resize((width, height), PIL.Image.LANCZOS))
    return canvas

@pytest.mark.parametrize('channels', [3, 1])
@pytest.mark.parametrize('transform,resolution', [(None, (16, 16)), ('center-crop', (16, 16)), ('center-crop-wide', (16, 8))])
def test_crop_and_resize_transforms_match_pillow(tmp_path, channels, transform, resolution):
    rng = np.random.default_rng(6)
    sizes = [(45, 30), (23, 37), (6, 6), (40, 17)] # odd sizes, a tall one, a tiny one, a wide one
    sources = [random_image(rng, w, h, channels) for w, h in sizes]
    for i, img in enumerate(sources):
        write_image(tmp_path / 'src' / f'{i}.png', img)
    args = ['--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--resolution', f'{resolution[0]}x{resolution[1]}']
    res = run_tool(*args, *(['--transform', transform] if transform else []))
    out, labels = read_dataset(tmp_path / 'out.zip')
    assert labels is None
    expected = {archive_name(i): expected_transform(img, transform, *resolution) for i, img in enumerate(sources)}
    expected = {name: img for name, img in expected.items() if img is not None}
    assert sorted(out) == sorted(expected) # center-crop-wide skips the image smaller than WxH
    for name, img in expected.items():
        assert out[name].shape == ((16, 16, 3) if channels == 3 or transform else (16, 16))
        np.testing.assert_array_equal(out[name], img)
    if len(expected) < len(sources):
        assert 'Skipped 1 images' in res.stdout

@pytest.mark.parametrize('channels', [3, 1])
def test_center_crop_wide_is_the_reference_where_it_keeps_the_aspect(tmp_path, channels):
    # The reference crops round(W h / w) rows: the W:H region when W^2 h = w^2 H (here 16 x 8 and 32 x 32 at 16x8);
    # other images it distorts (40 x 24: 10 rows resized to 8) where ours crops 20 rows.
    rng = np.random.default_rng(7)
    sources = [random_image(rng, w, h, channels) for w, h in [(16, 8), (32, 32), (40, 24)]]
    for i, img in enumerate(sources):
        write_image(tmp_path / 'src' / f'{i}.png', img)
    run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--resolution', '16x8', '--transform', 'center-crop-wide')
    out, _ = read_dataset(tmp_path / 'out.zip')
    reference = [reference_center_crop_wide(img, 16, 8) for img in sources]
    np.testing.assert_array_equal(out[archive_name(0)], reference[0])
    np.testing.assert_array_equal(out[archive_name(1)], reference[1])
    assert not np.array_equal(out[archive_name(2)], reference[2])
    np.testing.assert_array_equal(out[archive_name(2)], expected_transform(sources[2], 'center-crop-wide', 16, 8))

def adm_center_crop(img, size):
    """ADM's ImageNet crop as its authors describe it: halve by box filter while the short side is >= 2 size,
    bicubic to a short side of size, centre crop; RGB input."""
    pil = PIL.Image.fromarray(img).convert('RGB')
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), PIL.Image.BOX)
    pil = pil.resize(tuple(round(x * size / min(pil.size)) for x in pil.size), PIL.Image.BICUBIC)
    left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
    return np.array(pil.crop((left, top, left + size, top + size)))

def test_center_crop_dhariwal_and_edm2s_convert_command(tmp_path):
    # EDM2's ImageNet preparation: `dataset_tool.py convert ... --transform=center-crop-dhariwal` (EDM2's command form
    # of this tool); grayscale and CMYK JPEGs come out RGB, as EDM2 loads every image.
    rng = np.random.default_rng(8)
    sources = {'0.png': random_image(rng, 100, 60), '1.png': random_image(rng, 33, 70, channels=1), '2.png': random_image(rng, 16, 16)}
    for name, img in sources.items():
        write_image(tmp_path / 'src' / name, img)
    cmyk = PIL.Image.fromarray(random_image(rng, 40, 50)).convert('CMYK')
    cmyk.save(tmp_path / 'src' / '3.jpg', quality=95)
    with PIL.Image.open(tmp_path / 'src' / '3.jpg') as f:
        sources['3.jpg'] = np.array(f.convert('RGB'))
    run_tool('convert', '--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--resolution', '16x16', '--transform', 'center-crop-dhariwal')
    out, _ = read_dataset(tmp_path / 'out.zip')
    assert sorted(out) == [archive_name(i) for i in range(4)]
    for i, img in enumerate(sources.values()):
        np.testing.assert_array_equal(out[archive_name(i)], adm_center_crop(img, 16))
    res = run_tool('convert', '--source', tmp_path / 'src', '--dest', tmp_path / 'bad.zip', '--resolution', '16x8',
                   '--transform', 'center-crop-dhariwal', check=False)
    assert_clean_failure(res, 'center-crop-dhariwal needs W = H', tmp_path, tmp_path / 'bad.zip')
    # `convert` is the reference's command line: the same dataset.
    run_tool('--source', tmp_path / 'src', '--dest', tmp_path / 'ref.zip', '--resolution', '16x16', '--transform', 'center-crop')
    run_tool('convert', '--source', tmp_path / 'src', '--dest', tmp_path / 'same.zip', '--resolution', '16x16', '--transform', 'center-crop')
    ref, same = read_dataset(tmp_path / 'ref.zip'), read_dataset(tmp_path / 'same.zip')
    assert sorted(ref[0]) == sorted(same[0]) and all(np.array_equal(ref[0][k], same[0][k]) for k in ref[0]) and ref[1] == same[1]

def test_encode_writes_edm2s_latent_dataset(tmp_path):
    # `dataset_tool.py encode` (EDM2's) with a VAE folder: per image the mean and std of the latent distribution,
    # float32 [8, H/f, W/f], under EDM2's names, with the labels; training/dataset.py reads it as 8-channel data.
    import torch # pylint: disable=import-outside-toplevel
    from training.dataset import ImageFolderDataset # pylint: disable=import-outside-toplevel
    vae = make_tiny_vae(tmp_path / 'vae')
    rng = np.random.default_rng(9)
    images = [random_image(rng, 16, 16) for _ in range(4)]
    for i, img in enumerate(images):
        write_image(tmp_path / 'src' / ('a' if i % 2 else 'b') / f'{i}.png', img)
    run_tool('convert', '--source', tmp_path / 'src', '--dest', tmp_path / 'pixels.zip')
    res = run_tool('encode', '--model-url', tmp_path / 'vae', '--source', tmp_path / 'pixels.zip', '--dest', tmp_path / 'latents.zip',
                   '--device', 'cpu')
    assert 'Traceback' not in res.stderr
    pixels, pixel_labels = read_dataset(tmp_path / 'pixels.zip')
    with zipfile.ZipFile(tmp_path / 'latents.zip') as z:
        names = sorted(n for n in z.namelist() if n != 'dataset.json')
        assert names == [f'00000/img-mean-std-{i:08d}.npy' for i in range(4)]
        labels = json.loads(z.read('dataset.json'))['labels']
        latents = {n: np.load(io.BytesIO(z.read(n)), allow_pickle=False) for n in names}
    assert [label for _, label in labels] == [label for _, label in pixel_labels] and [n for n, _ in labels] == names
    for name, pixel_name in zip(names, sorted(pixels)):
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(pixels[pixel_name]).permute(2, 0, 1).unsqueeze(0).float() / 255)['latent_dist']
        assert latents[name].dtype == np.float32 and latents[name].shape == (8, 8, 8)
        np.testing.assert_allclose(latents[name], torch.cat([dist.mean, dist.std], dim=1)[0].numpy(), rtol=1e-5, atol=1e-6)
    dataset = ImageFolderDataset(str(tmp_path / 'latents.zip'), use_labels=True)
    assert dataset.num_channels == 8 and dataset.resolution == 8 and len(dataset) == 4
    res = run_tool('encode', '--model-url', tmp_path / 'src', '--source', tmp_path / 'pixels.zip', '--dest', tmp_path / 'bad.zip',
                   '--device', 'cpu', check=False) # not a VAE folder
    assert_clean_failure(res, 'holds no AutoencoderKL with safetensors weights', tmp_path, tmp_path / 'bad.zip')

#----------------------------------------------------------------------------
# Bad input: one line, no traceback, non-zero exit, nothing left behind.

def assert_clean_failure(res, fragment, tmp_path, dest):
    assert res.returncode != 0
    assert 'Traceback' not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and fragment in errors[0], res.stderr
    assert not os.path.lexists(dest)
    assert leftovers(tmp_path) == []

def make_folder(tmp_path, images):
    for name, img in images.items():
        if isinstance(img, bytes):
            os.makedirs(tmp_path / 'src', exist_ok=True)
            (tmp_path / 'src' / name).write_bytes(img)
        else:
            write_image(tmp_path / 'src' / name, img)
    return tmp_path / 'src'

def bad_input(kind, tmp_path):
    """(arguments after --source/--dest, source, expected fragment of the error) for each kind of bad input."""
    rng = np.random.default_rng(7)
    rgb8 = random_image(rng, 8, 8)
    if kind == 'missing source':
        return [], tmp_path / 'absent', 'source not found'
    if kind == 'unknown source type':
        (tmp_path / 'data.tar.gz').write_bytes(b'x')
        return [], tmp_path / 'data.tar.gz', 'unknown source type'
    if kind == 'no images':
        (tmp_path / 'src').mkdir()
        (tmp_path / 'src' / 'readme.txt').write_text('nothing here')
        return [], tmp_path / 'src', 'no image files found'
    if kind == 'corrupt image':
        return [], make_folder(tmp_path, {'a.png': rgb8, 'b.png': b'\x89PNG\r\n\x1a\nbroken', 'c.png': rgb8}), 'b.png: not a readable image'
    if kind == 'not square':
        return [], make_folder(tmp_path, {'a.png': random_image(rng, 16, 8)}), 'must be square'
    if kind == 'not a power of two':
        return [], make_folder(tmp_path, {'a.png': random_image(rng, 12, 12)}), 'power of two'
    if kind == 'mixed sizes':
        return [], make_folder(tmp_path, {'a.png': rgb8, 'b.png': random_image(rng, 16, 16)}), 'b.png: 16x16'
    if kind == 'mixed channels':
        return [], make_folder(tmp_path, {'a.png': rgb8, 'b.png': random_image(rng, 8, 8, channels=1)}), 'b.png: 8x8 with 1 channel'
    if kind == 'RGBA':
        return [], make_folder(tmp_path, {'a.png': random_image(rng, 8, 8, channels=4)}), 'RGB or grayscale'
    if kind == 'transform without resolution':
        return ['--transform', 'center-crop'], make_folder(tmp_path, {'a.png': rgb8}), 'needs --resolution'
    if kind == 'malformed resolution':
        return ['--resolution', '64'], make_folder(tmp_path, {'a.png': rgb8}), '--resolution must be WxH'
    if kind == 'zero max-images':
        return ['--max-images', '0'], make_folder(tmp_path, {'a.png': rgb8}), '--max-images'
    if kind == 'cifar missing batch':
        write_cifar10(tmp_path / 'cifar-10-python.tar.gz', [1] * 5, rng, drop_batch=3)
        return [], tmp_path / 'cifar-10-python.tar.gz', 'data_batch_3'
    if kind == 'cifar wrong data shape':
        write_cifar10(tmp_path / 'cifar-10-python.tar.gz', [1] * 5, rng, data_shape=[1, 100])
        return [], tmp_path / 'cifar-10-python.tar.gz', 'shape [N, 3072]'
    if kind == 'cifar not gzip':
        (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'not a gzip file')
        return [], tmp_path / 'cifar-10-python.tar.gz', 'not a readable .tar.gz'
    if kind == 'mnist truncated':
        write_mnist(tmp_path, 5, rng, num_stored=3)
        return [], tmp_path / 'train-images-idx3-ubyte.gz', 'ends after 3 of the 5 images'
    if kind == 'mnist without labels':
        write_mnist(tmp_path, 2, rng)
        os.remove(tmp_path / 'train-labels-idx1-ubyte.gz')
        return [], tmp_path / 'train-images-idx3-ubyte.gz', 'labels file'
    raise AssertionError(kind)

BAD_INPUTS = ['missing source', 'unknown source type', 'no images', 'corrupt image', 'not square', 'not a power of two',
              'mixed sizes', 'mixed channels', 'RGBA', 'transform without resolution', 'malformed resolution',
              'zero max-images', 'cifar missing batch', 'cifar wrong data shape', 'cifar not gzip', 'mnist truncated',
              'mnist without labels']

@pytest.mark.parametrize('kind', BAD_INPUTS)
def test_bad_input_leaves_no_output(tmp_path, kind):
    args, source, fragment = bad_input(kind, tmp_path)
    # A zip in folders that do not exist yet: they must not be left behind either.
    res = run_tool('--source', source, '--dest', tmp_path / 'new' / 'sub' / 'out.zip', *args, check=False)
    assert_clean_failure(res, fragment, tmp_path, tmp_path / 'new')

@pytest.mark.parametrize('kind', ['corrupt image', 'mixed sizes'])
def test_failure_midway_leaves_no_folder(tmp_path, kind):
    args, source, fragment = bad_input(kind, tmp_path)
    (tmp_path / 'out').mkdir() # an empty destination folder stays as it was
    res = run_tool('--source', source, '--dest', tmp_path / 'out', *args, check=False)
    assert_clean_failure(res, fragment, tmp_path, tmp_path / 'out' / '00000')
    assert os.listdir(tmp_path / 'out') == []

def test_a_nonempty_or_bad_destination_is_refused(tmp_path):
    source = make_folder(tmp_path, {'a.png': random_image(np.random.default_rng(8), 8, 8)})
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('mine')
    res = run_tool('--source', source, '--dest', tmp_path / 'full', check=False)
    assert_clean_failure(res, 'is not empty', tmp_path, tmp_path / 'full' / '00000')
    assert os.listdir(tmp_path / 'full') == ['keep.txt']

    for dest in [source, source / 'out.zip', source / 'sub']:
        res = run_tool('--source', source, '--dest', dest, check=False)
        assert_clean_failure(res, 'is the same as or inside --source', tmp_path, source / 'out.zip')
        assert sorted(os.listdir(source)) == ['a.png']

    # The same source into an empty existing folder works.
    (tmp_path / 'empty').mkdir()
    run_tool('--source', source, '--dest', tmp_path / 'empty')
    assert sorted(os.listdir(tmp_path / 'empty')) == ['00000', 'dataset.json']

#----------------------------------------------------------------------------
