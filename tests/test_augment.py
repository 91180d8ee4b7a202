"""AugmentPipe: the reference's outputs (tests/fixtures/augment.npz), label layout, probabilities, and
each transform against its closed form."""

import json
import math
import pickle
import textwrap

import numpy as np
import pytest
import torch

from conftest import fixture_file, run_script
from training import augment
from training.augment import AugmentPipe

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

ALL_TRANSFORMS = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                      brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
ALL_COLUMNS = 1 + 1 + 2 + 2 + 1 + 2 + 2 + 2 + 1 + 1 + 1 + 2 + 1 # Label widths in the spec's table.
EDM_SETTING = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

# The reference's geometric transforms act about the point (d, d) from the image centre, with d set by the
# sym6 filter's centroid (5.098) against the tap that the sampling grid assumes (5): d = -0.049 pixels.
CENTRE_OFFSET = (5 - np.dot(np.arange(12), augment._SYM6) / np.sum(augment._SYM6)) / 2

#----------------------------------------------------------------------------

def _centred_grid(H, W):
    y, x = np.meshgrid(np.arange(H) - (H - 1) / 2, np.arange(W) - (W - 1) / 2, indexing='ij')
    return x, y

def _smooth(x, y):
    # Two plane waves in generic directions (wavelengths 11 and 13 pixels).
    k1 = 2 * np.pi / 11 * np.array([0.8, 0.6])
    k2 = 2 * np.pi / 13 * np.array([-0.3, 0.95])
    return np.cos(k1[0] * x + k1[1] * y + 0.3) + 0.5 * np.cos(k2[0] * x + k2[1] * y + 1.1)

def _rotation(theta):
    # Output-to-input map of content rotated counterclockwise (as displayed, y pointing down) by theta.
    return np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])

def _stretch(w, r, std):
    # Output-to-input map of a stretch by 2^(w std) along the axis at angle r (as displayed) and its inverse across it.
    s = 2 ** (w * std)
    d = np.array([math.cos(r), -math.sin(r)])
    n = np.array([math.sin(r), math.cos(r)])
    G = np.eye(3)
    G[:2, :2] = np.outer(d, d) / s + np.outer(n, n) * s
    return G

def _augment_cases():
    with np.load(fixture_file('augment.npz')) as data:
        return sorted({key.rsplit('/', 1)[0] for key in data.files if key.endswith('/kwargs')})

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def reference():
    return dict(np.load(fixture_file('augment.npz')))

def test_augmentations_match_the_reference_outputs(reference):
    for case in _augment_cases():
        pipe = AugmentPipe(**json.loads(str(reference[f'{case}/kwargs'])))
        torch.manual_seed(int(reference[f'{case}/seed']))
        images, labels = pipe(torch.from_numpy(reference[f'input/{case.split("/")[1]}']))
        np.testing.assert_array_equal(labels.numpy(), reference[f'{case}/labels'], err_msg=case)
        err = np.abs(images.numpy() - reference[f'{case}/images']).max()
        assert err < 1e-5, f'{case}: {err}'

def test_options_are_floats_and_checked():
    pipe = AugmentPipe(p=1, xflip=100000000, scale_std=0.25)
    assert isinstance(pipe.p, float) and pipe.p == 1.0
    assert isinstance(pipe.xflip, float) and pipe.xflip == 1e8
    assert isinstance(pipe.yflip, float) and pipe.yflip == 0.0
    assert pipe.scale_std == 0.25 and pipe.translate_int_max == 0.125 and pipe.saturation_std == 1.0
    with pytest.raises(ValueError, match='scale_std'):
        AugmentPipe(scale_std=-1)
    with pytest.raises(ValueError, match='hue'):
        AugmentPipe(hue='often')


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match='N, C, H, W'):
        AugmentPipe(xflip=1)(torch.zeros([3, 8, 8]))
    with pytest.raises(ValueError, match='channels'):
        AugmentPipe(brightness=1)(torch.zeros([2, 4, 8, 8]))
    with pytest.raises(ValueError, match='square'):
        AugmentPipe(rotate_int=1)(torch.zeros([2, 3, 8, 10]))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('channels', [1, 3])
def test_p0_leaves_images_unchanged(device, channels):
    torch.manual_seed(0)
    images = torch.randn([6, channels, 8, 8], device=device)
    out, labels = AugmentPipe(p=0, **ALL_TRANSFORMS)(images)
    assert torch.equal(out, images)
    assert labels.dtype == torch.float32 and labels.device == images.device
    assert labels.shape == (6, ALL_COLUMNS) and not labels.any()


def test_disabled_transforms_add_no_columns():
    images = torch.randn([5, 3, 8, 8])
    assert AugmentPipe()(images)[1].shape == (5, 0)
    assert AugmentPipe(hue=1, rotate_int=1)(images)[1].shape == (5, 4)


def test_edm_setting_labels_match_what_fired():
    torch.manual_seed(1)
    N = 128
    images = torch.rand([N, 3, 16, 16]) * 2 - 1 # Pixel values in [-1, 1], as in training.
    out, labels = AugmentPipe(p=0.5, **EDM_SETTING)(images)
    assert labels.shape == (N, 9) and out.shape == images.shape
    xf, yf, scale, rot_c, rot_s, an_x, an_y, tx, ty = labels.T
    assert set(xf.tolist()) == {0, 1} and set(yf.tolist()) == {0, 1}
    assert torch.equal(rot_c != 0, rot_s != 0) # A rotation sets both columns or neither.
    assert torch.equal(tx != 0, ty != 0)
    assert not (an_y != 0)[an_x == 0].any() # The aniso y column is zero whenever x is (axis angle 0 or skipped).
    for fired in [scale != 0, rot_c != 0, an_x != 0, tx != 0]:
        assert 0 < fired.sum() < N # p = 0.5: fired for some images, skipped for others.

    # Images without a geometric transform are the flipped input; the others differ from it.
    flipped = torch.where(xf.reshape(N, 1, 1, 1) == 1, images.flip(3), images)
    flipped = torch.where(yf.reshape(N, 1, 1, 1) == 1, flipped.flip(2), flipped)
    untouched = (labels[:, 2:] == 0).all(dim=1)
    assert 0 < untouched.sum() < N
    err = (out - flipped).abs().flatten(1).max(dim=1).values
    assert err[untouched].max() < 1e-5 # The 2x up/down sym6 filters reconstruct exactly.
    assert err[~untouched].min() > 1e-2


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name, dim', [('xflip', 3), ('yflip', 2)])
def test_flip_label_means_mirrored(device, name, dim):
    torch.manual_seed(2)
    images = torch.randn([32, 3, 8, 8], device=device)
    out, labels = AugmentPipe(**{name: 1})(images)
    w = labels[:, 0]
    assert set(w.tolist()) == {0, 1}
    assert torch.equal(out[w == 1], images[w == 1].flip(dim))
    assert torch.equal(out[w == 0], images[w == 0])


def test_augmentation_probabilities_follow_the_multipliers():
    torch.manual_seed(3)
    N = 4000
    pipe = AugmentPipe(p=0.3, xflip=1e8, yflip=1, rotate_int=1, scale=1, brightness=2)
    _, labels = pipe(torch.randn([N, 1, 4, 4]))
    xf, yf, rot_a, rot_b, scale, bright = labels.T

    def check(fired, q):
        # Frequency within 5 standard deviations of the binomial proportion.
        assert abs(fired.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / N)
    check(xf == 1, 0.5) # Always applied (1e8 * p >= 1), w in {0, 1}.
    check(yf == 1, 0.3 * 0.5)
    for a, b in [(1, 0), (1, 1), (0, 1)]: # One, two, three quarter turns.
        check((rot_a == a) & (rot_b == b), 0.3 / 4)
    check(scale != 0, 0.3)
    check(bright != 0, 0.6)


@pytest.mark.parametrize('device', DEVICES)
def test_rotate_int_is_rot90(device):
    torch.manual_seed(4)
    images = torch.randn([32, 2, 8, 8], device=device)
    out, labels = AugmentPipe(rotate_int=1)(images)
    quarter_turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(len(images)):
        k = quarter_turns[tuple(int(v) for v in labels[i].tolist())]
        assert torch.equal(out[i], torch.rot90(images[i], k, dims=[1, 2])) # Counterclockwise as displayed.
        seen.add(k)
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize('device', DEVICES)
def test_translate_int_shifts_with_mirroring(device):
    torch.manual_seed(5)
    H, W, m = 8, 12, 0.25
    images = torch.randn([32, 3, H, W], device=device)
    out, labels = AugmentPipe(translate_int=1, translate_int_max=m)(images)
    tx = labels[:, 0] * (W * m)
    ty = labels[:, 1] * (H * m)
    assert torch.equal(tx, tx.round()) and torch.equal(ty, ty.round())
    assert tx.abs().max() <= round(W * m) and ty.abs().max() <= round(H * m) and (tx != 0).any() and (ty != 0).any()
    padded = torch.nn.functional.pad(images, [3, 3, 3, 3], mode='reflect')
    for i in range(len(images)):
        dx, dy = int(tx[i]), int(ty[i])
        # Content moves right by tx and up by ty: out[y, x] = in[y + ty, x - tx], mirrored at the edges.
        expected = padded[i, :, 3 + dy : 3 + dy + H, 3 - dx : 3 - dx + W]
        assert torch.equal(out[i], expected)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', ['scale', 'rotate_frac', 'aniso', 'aniso_horizontal', 'translate_frac', 'all'])
def test_geometric_transforms_match_closed_form(device, case):
    H = W = 32
    N = 12
    std = 0.15 # For scale and aniso; translate_frac_std 0.04 (1.3 pixels), so the centre stays inside.
    kwargs = dict(scale_std=std, aniso_std=std, translate_frac_std=0.04)
    kwargs.update({k: 1 for k in ['scale', 'rotate_frac', 'aniso', 'translate_frac'] if case.startswith(k) or case == 'all'})
    if case == 'aniso_horizontal':
        kwargs['aniso_rotate_prob'] = 0 # Axis angle r = 0: the labels are (w, 0).
    x, y = _centred_grid(H, W)
    images = torch.tensor(_smooth(x, y), dtype=torch.float32, device=device).repeat(N, 1, 1, 1)
    torch.manual_seed(6)
    out, labels = AugmentPipe(**kwargs)(images)
    out, labels = out.cpu().double().numpy(), labels.cpu().double().numpy()

    inside = x ** 2 + y ** 2 < 7 ** 2 # Away from the mirrored borders.
    about_centre = np.eye(3)
    about_centre[:2, 2] = CENTRE_OFFSET
    points = np.linalg.inv(about_centre) @ np.stack([x.ravel(), y.ravel(), np.ones(H * W)])
    for i in range(N):
        l = list(labels[i])
        candidates = [np.eye(3)] # Output-to-input maps consistent with the labels.
        if 'scale' in kwargs:
            s = 2 ** (l.pop(0) * std)
            candidates = [G @ np.diag([1 / s, 1 / s, 1]) for G in candidates]
        if 'rotate_frac' in kwargs:
            c, s = l.pop(0) + 1, l.pop(0)
            candidates = [G @ _rotation(math.atan2(s, c)) for G in candidates]
        if 'aniso' in kwargs:
            # (w cos r, w sin r) leaves the sign of w open, i.e. stretch or squeeze along the axis.
            ax, ay = l.pop(0), l.pop(0)
            if case == 'aniso_horizontal':
                assert ay == 0
                candidates = [G @ _stretch(ax, 0, std) for G in candidates]
            else:
                w, r = math.hypot(ax, ay), math.atan2(ay, ax)
                candidates = [G @ _stretch(sign * w, r, std) for G in candidates for sign in (1, -1)]
        if 'translate_frac' in kwargs:
            T = np.eye(3)
            T[:2, 2] = [-l.pop(0) * W * 0.04, -l.pop(0) * H * 0.04] # Content moves right and down.
            candidates = [G @ T for G in candidates]
        errors = []
        for G in candidates:
            p = about_centre @ G @ points
            expected = _smooth(p[0], p[1]).reshape(H, W)
            errors.append(np.abs(out[i, 0] - expected)[inside].max())
        assert min(errors) < 0.04, f'image {i}: labels {labels[i]} error {min(errors)}'
        if labels[i].any():
            assert np.abs(out[i, 0] - images[i, 0].cpu().numpy())[inside].max() > 0.02


def test_geometric_identity_on_non_square_images():
    torch.manual_seed(7)
    images = torch.rand([48, 2, 6, 10]) * 2 - 1
    out, labels = AugmentPipe(p=0.5, scale=1, rotate_frac=1, aniso=1, translate_frac=1)(images)
    untouched = (labels == 0).all(dim=1)
    assert untouched.any() and not untouched.all()
    assert (out[untouched] - images[untouched]).abs().max() < 1e-5


def test_full_margin_padding_gives_the_same_images():
    # The device path pads by the full margin rather than reading the needed one back; the samples must not change.
    torch.manual_seed(3)
    N, H, W = 16, 12, 20
    images = torch.rand([N, 3, H, W]) * 2 - 1
    G_inv = torch.eye(3).repeat(N, 1, 1)
    theta = torch.rand([N]) * 2 * math.pi
    s = torch.exp2(torch.randn([N]) * 0.3)
    G_inv[:, 0, 0], G_inv[:, 0, 1] = torch.cos(theta) / s, -torch.sin(theta) / s
    G_inv[:, 1, 0], G_inv[:, 1, 1] = torch.sin(theta) / s, torch.cos(theta) / s
    G_inv[:, 0, 2], G_inv[:, 1, 2] = torch.randn([N]) * 2, torch.randn([N]) * 2
    G_inv[:4] = torch.eye(3) # images needing a small margin next to ones that need the largest
    needed = augment._affine_resample(images, G_inv, full_margin=False)
    full = augment._affine_resample(images, G_inv, full_margin=True)
    assert (needed[:4] - images[:4]).abs().max() < 1e-5
    assert (full - needed).abs().max() < 1e-5


@pytest.mark.parametrize('device', DEVICES)
def test_luma_transforms_closed_form(device):
    torch.manual_seed(8)
    for channels in [1, 3]:
        images = torch.rand([32, channels, 4, 4], device=device)
        pipe = AugmentPipe(brightness=1, contrast=1, lumaflip=1, brightness_std=0.2, contrast_std=0.5)
        out, labels = pipe(images)
        b, c, flip = [v.reshape(-1, 1, 1, 1) for v in labels.T]
        z = (images + b * 0.2) * 2 ** (c * 0.5) # Brightness, then contrast.
        expected = z - 2 * (flip == 1) * z.mean(dim=1, keepdim=True) # Luma flip: grey component negated.
        assert (out - expected).abs().max() < 1e-5
        assert set(flip.flatten().tolist()) == {0, 1} and (b != 0).all() and (c != 0).all()


@pytest.mark.parametrize('device', DEVICES)
def test_hue_and_saturation_keep_luma(device):
    torch.manual_seed(9)
    images = torch.rand([16, 3, 4, 4], device=device)
    out, labels = AugmentPipe(hue=1, saturation=1)(images)
    assert labels.shape == (16, 3) and labels.abs().sum(dim=1).min() > 0
    assert (out.mean(dim=1) - images.mean(dim=1)).abs().max() < 1e-5 # Rotation about and scaling across the grey axis.
    assert (out - images).abs().max() > 0.05
    grey = images[:, :1]
    out, _ = AugmentPipe(hue=1, saturation=1)(grey) # One channel: luma is unaffected.
    assert (out - grey).abs().max() < 1e-5


def test_grayscale_with_everything_enabled():
    torch.manual_seed(10)
    images = torch.rand([8, 1, 8, 8])
    out, labels = AugmentPipe(p=0.8, **ALL_TRANSFORMS)(images)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert labels.shape == (8, ALL_COLUMNS) and labels.any()


def test_pickle_reloads_in_fresh_process(tmp_path):
    pipe = AugmentPipe(p=0.7, brightness=0.5, hue=0.5, **EDM_SETTING)
    with open(tmp_path / 'pipe.pkl', 'wb') as f:
        pickle.dump(dict(augment_pipe=pipe), f)
    torch.manual_seed(11)
    images = torch.randn([8, 3, 16, 16])
    np.save(tmp_path / 'images.npy', images.numpy())
    torch.manual_seed(123)
    out, labels = pipe(images)

    script = textwrap.dedent('''
        import pickle, sys, numpy as np, torch
        with open('pipe.pkl', 'rb') as f:
            pipe = pickle.load(f)['augment_pipe']
        assert 'training.augment' not in sys.modules # Executed from the source stored in the pickle.
        assert type(pipe).__name__ == 'AugmentPipe' and pipe.xflip == 1e8 and pipe.p == 0.7
        assert dict(pipe.init_kwargs)['translate_frac'] == 1
        torch.manual_seed(123)
        out, labels = pipe(torch.as_tensor(np.load('images.npy')))
        np.savez('out.npz', out=out.numpy(), labels=labels.numpy())
    ''')
    run_script(['-c', script], cwd=str(tmp_path))
    reloaded = np.load(tmp_path / 'out.npz')
    np.testing.assert_array_equal(reloaded['labels'], labels.numpy())
    np.testing.assert_allclose(reloaded['out'], out.numpy(), rtol=0, atol=1e-6)

#----------------------------------------------------------------------------
