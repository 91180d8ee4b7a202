"""ImageFolderDataset on datasets written by dataset_tool.py: zip and folder
agree, max_size / xflip / labels follow the spec, and it pickles into workers."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import run_script
from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------

def write_image(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(img).save(path)

@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """Six 8x8 RGB images in two class folders, converted to a zip and to a folder."""
    tmp = tmp_path_factory.mktemp('converted')
    rng = np.random.default_rng(0)
    sources = {f'{cls}/{i}.png': rng.integers(0, 256, [8, 8, 3], dtype=np.uint8) for cls, i in
               [('b', 0), ('a', 1), ('b', 2), ('a', 3), ('b', 4), ('a', 5)]}
    for rel_path, img in sources.items():
        write_image(tmp / 'src' / rel_path, img)
    for dest in ['ds.zip', 'ds']:
        run_script(['dataset_tool.py', '--source', tmp / 'src', '--dest', tmp / dest])
    order = sorted(sources) # a/1, a/3, a/5, b/0, b/2, b/4
    images = np.stack([sources[p].transpose(2, 0, 1) for p in order]) # NCHW
    labels = np.array([0 if p.startswith('a/') else 1 for p in order])
    return dict(zip=str(tmp / 'ds.zip'), folder=str(tmp / 'ds'), images=images, labels=labels)

def items(dataset):
    return [dataset[i] for i in range(len(dataset))]

#----------------------------------------------------------------------------

def test_zip_and_folder_load_identically(converted):
    onehot = np.eye(2, dtype=np.float32)[converted['labels']]
    for use_pyspng in [True, False]:
        for kind in ['zip', 'folder']:
            dataset = ImageFolderDataset(converted[kind], use_labels=True, use_pyspng=use_pyspng)
            assert dataset.name == 'ds' and len(dataset) == 6
            assert dataset.image_shape == [3, 8, 8] and dataset.num_channels == 3 and dataset.resolution == 8
            assert dataset.label_shape == [2] and dataset.label_dim == 2
            assert dataset.has_labels and dataset.has_onehot_labels
            for i, (image, label) in enumerate(items(dataset)):
                assert image.dtype == np.uint8 and label.dtype == np.float32
                np.testing.assert_array_equal(image, converted['images'][i])
                np.testing.assert_array_equal(label, onehot[i])
                assert dataset.get_details(i).raw_label == converted['labels'][i]
            dataset.close()

@pytest.mark.parametrize('mode', ['P', 'P+transparency', 'L', 'LA', 'RGBA'])
def test_pyspng_and_pillow_decode_every_png_alike(tmp_path, mode):
    # pyspng (when installed) and Pillow give the same arrays for every kind of 8-bit PNG.
    rng = np.random.default_rng(5)
    folder = tmp_path / 'src'
    folder.mkdir()
    for i in range(2):
        rgba = rng.integers(0, 256, size=[8, 8, 4], dtype=np.uint8)
        if mode.startswith('P'):
            img = PIL.Image.fromarray(rgba[:, :, :3]).quantize(colors=256) # an 8-bit palette
            img.save(folder / f'{i}.png', **({'transparency': 0} if mode == 'P+transparency' else {}))
        else:
            PIL.Image.fromarray({'L': rgba[:, :, 0], 'LA': rgba[:, :, :2], 'RGBA': rgba}[mode], mode).save(folder / f'{i}.png')
    fast, plain = (ImageFolderDataset(str(folder), use_pyspng=flag) for flag in (True, False))
    assert fast.image_shape == plain.image_shape == [{'P': 3, 'P+transparency': 4, 'L': 1, 'LA': 2, 'RGBA': 4}[mode], 8, 8]
    for (a, _), (b, _) in zip(items(fast), items(plain)):
        np.testing.assert_array_equal(a, b)

def test_a_dataset_without_labels_has_label_dim_zero(converted):
    dataset = ImageFolderDataset(converted['zip'], resolution=8)
    assert dataset.label_shape == [0] and dataset.label_dim == 0
    assert not dataset.has_labels and not dataset.has_onehot_labels
    image, label = dataset[0]
    assert label.shape == (0,) and label.dtype == np.float32

def test_max_size_and_xflip(converted):
    seed = (1 << 31) + 7 # the seed is taken modulo 2**31
    dataset = ImageFolderDataset(converted['folder'], use_labels=True, max_size=4, random_seed=seed, xflip=True)
    raw_idx = np.sort(np.random.RandomState(7).permutation(6)[:4]) # shuffled with the seed, first four, sorted
    assert len(dataset) == 8
    for i in range(8):
        details = dataset.get_details(i)
        assert details.raw_idx == raw_idx[i % 4] and details.xflip == (i >= 4)
        image, label = dataset[i]
        expected = converted['images'][raw_idx[i % 4]]
        np.testing.assert_array_equal(image, expected[:, :, ::-1] if i >= 4 else expected)
        assert label.argmax() == converted['labels'][raw_idx[i % 4]]
    assert len(ImageFolderDataset(converted['folder'], max_size=100)) == 6

def test_returned_image_is_a_copy(converted):
    dataset = ImageFolderDataset(converted['zip'], cache=True)
    image, _ = dataset[0]
    image[:] = 0
    np.testing.assert_array_equal(dataset[0][0], converted['images'][0])

def test_float_labels_and_grayscale(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, [3, 4, 4], dtype=np.uint8)
    vectors = rng.standard_normal([3, 5]).astype(np.float32)
    for i, img in enumerate(images):
        write_image(tmp_path / 'gray' / 'sub' / f'{i}.png', img)
    (tmp_path / 'gray' / 'dataset.json').write_text(json.dumps(dict(labels=[[f'sub/{i}.png', v.tolist()] for i, v in enumerate(vectors)])))
    dataset = ImageFolderDataset(str(tmp_path / 'gray'), use_labels=True)
    assert dataset.image_shape == [1, 4, 4] and dataset.num_channels == 1
    assert dataset.label_shape == [5] and dataset.has_labels and not dataset.has_onehot_labels
    for i, (image, label) in enumerate(items(dataset)):
        np.testing.assert_array_equal(image, images[i][np.newaxis])
        np.testing.assert_array_equal(label, vectors[i])

def test_pickles_and_works_in_a_dataloader(converted):
    dataset = ImageFolderDataset(converted['zip'], use_labels=True, xflip=True)
    expected = items(dataset) # opens the zip in this process
    clone = pickle.loads(pickle.dumps(dataset))
    for (image, label), (image2, label2) in zip(expected, items(clone)):
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(label, label2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=1, shuffle=False)
    batches = list(loader)
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), np.stack([x[0] for x in expected]))
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), np.stack([x[1] for x in expected]))
    dataset.close()

def test_cache_keeps_decoded_images(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, [2, 4, 4, 3], dtype=np.uint8)
    for i, img in enumerate(images):
        write_image(tmp_path / 'ds' / f'{i}.png', img)
    cached = ImageFolderDataset(str(tmp_path / 'ds'), cache=True)
    uncached = ImageFolderDataset(str(tmp_path / 'ds'))
    first = items(cached)
    for i in range(2):
        os.remove(tmp_path / 'ds' / f'{i}.png')
    for i, (image, _label) in enumerate(items(cached)):
        np.testing.assert_array_equal(image, first[i][0])
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
    with pytest.raises(ValueError, match='0.png'):
        uncached[0]

#----------------------------------------------------------------------------

def test_bad_datasets_raise_errors_naming_the_file(tmp_path, converted):
    with pytest.raises(ValueError, match='not found'):
        ImageFolderDataset(str(tmp_path / 'absent.zip'))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('no images')
    with pytest.raises(ValueError, match='no image files'):
        ImageFolderDataset(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match='resolution 16'):
        ImageFolderDataset(converted['zip'], resolution=16)

    rng = np.random.default_rng(3)
    write_image(tmp_path / 'mixed' / 'a.png', rng.integers(0, 256, [8, 8, 3], dtype=np.uint8))
    write_image(tmp_path / 'mixed' / 'b.png', rng.integers(0, 256, [16, 16, 3], dtype=np.uint8))
    (tmp_path / 'mixed' / 'c.png').write_bytes(b'\x89PNG\r\n\x1a\ntruncated')
    dataset = ImageFolderDataset(str(tmp_path / 'mixed'))
    with pytest.raises(ValueError, match=r'b\.png: image shape'):
        dataset[1]
    with pytest.raises(ValueError, match=r'c\.png: not a readable image'):
        dataset[2]
    os.remove(tmp_path / 'mixed' / 'a.png')
    os.remove(tmp_path / 'mixed' / 'b.png')
    with pytest.raises(ValueError, match=r'c\.png: not a readable image'):
        ImageFolderDataset(str(tmp_path / 'mixed'))

    write_image(tmp_path / 'partial' / 'a.png', rng.integers(0, 256, [4, 4], dtype=np.uint8))
    write_image(tmp_path / 'partial' / 'b.png', rng.integers(0, 256, [4, 4], dtype=np.uint8))
    (tmp_path / 'partial' / 'dataset.json').write_text(json.dumps(dict(labels=[['a.png', 1]])))
    with pytest.raises(ValueError, match='no label for b.png'):
        ImageFolderDataset(str(tmp_path / 'partial'), use_labels=True).get_label(0)
    assert not ImageFolderDataset(str(tmp_path / 'partial'), use_labels=False).has_labels

#----------------------------------------------------------------------------
