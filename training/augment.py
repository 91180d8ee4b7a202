"""Non-leaking augmentation pipeline in the style of "Training Generative
Adversarial Networks with Limited Data" (Karras et al. 2020), as used by EDM.

The network sees the augmented image together with a vector of augmentation
labels describing what was done to it; at sampling time it gets no labels and
generates clean images.

This module travels inside training snapshots and is executed by whichever
release loads them, so it imports only the standard library, numpy, torch,
torch_utils.persistence and torch_utils.misc.constant. It uses plain torch
operations only (no custom kernels), so it runs on any device.

Random draws come from torch's global generator on the images' device, in a
fixed order (N = batch size; every "gate" is rand([N]) < multiplier * p and
selects between the drawn value and zero):
    xflip           randint(2, [N]), gate
    yflip           randint(2, [N]), gate
    rotate_int      randint(4, [N]), gate
    translate_int   rand([2, N]), gate
    scale           randn([N]), gate
    rotate_frac     rand([N]), gate
    aniso           randn([N]), rand([N]) (axis angle), gate, rand([N]) (angle kept?)
    translate_frac  randn([2, N]), gate
    brightness      randn([N]), gate
    contrast        randn([N]), gate
    lumaflip        randint(2, [N]), gate
    hue             rand([N]), gate
    saturation      randn([N]), gate
Only enabled transforms (multiplier > 0) draw; the draws happen even when p = 0.

Image coordinates: x = column index (to the right), y = row index (downwards).
"""

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc

#----------------------------------------------------------------------------
# Low-pass decomposition filter of the Symlet wavelet with 6 vanishing
# moments ('sym6'): orthonormal (sum h = sqrt(2), sum h^2 = 1, sum h[k] h[k+2m]
# = 0 for m != 0), so 2x upsampling followed by 2x downsampling with it is the
# identity. It is the least asymmetric such filter; its centroid is at
# k = 5.098 instead of the midpoint 5.5 (see _affine_resample).

_SYM6 = [
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
]

#----------------------------------------------------------------------------
# Batched homogeneous matrices. Each entry is a Python number or a tensor of
# shape [N]; the result has shape [N, rows, cols].

def _matrix(*rows, device):
    entries = [x for row in rows for x in row]
    ref = next((x for x in entries if isinstance(x, torch.Tensor)), None)
    if ref is None:
        return misc.constant(np.asarray(rows, dtype=np.float32), device=device)
    ref = ref.to(device=device, dtype=torch.float32)
    entries = [x.to(ref) if isinstance(x, torch.Tensor) else ref.new_full(ref.shape, float(x)) for x in entries]
    return torch.stack(entries, dim=-1).reshape(*ref.shape, len(rows), -1)

def _translate2d(tx, ty, device):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)

def _scale2d(sx, sy, device):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)

def _rotate2d(theta, device):
    # Rotation from the x axis towards the y axis (clockwise as displayed, since y points down).
    return _matrix([torch.cos(theta), -torch.sin(theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1], device=device)

def _translate3d(tx, ty, tz, device):
    return _matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], device=device)

def _scale3d(sx, sy, sz, device):
    return _matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], device=device)

def _rotate3d(v, theta, device):
    # Rotation by theta about the unit axis v (a numpy vector; Rodrigues' formula).
    vx, vy, vz = float(v[0]), float(v[1]), float(v[2])
    c, s = torch.cos(theta), torch.sin(theta)
    d = 1 - c
    return _matrix(
        [vx * vx * d + c,      vx * vy * d - vz * s, vx * vz * d + vy * s, 0],
        [vy * vx * d + vz * s, vy * vy * d + c,      vy * vz * d - vx * s, 0],
        [vz * vx * d - vy * s, vz * vy * d + vx * s, vz * vz * d + c,      0],
        [0, 0, 0, 1], device=device)

#----------------------------------------------------------------------------
# Mirror an integer index into [0, size) (reflection without repeating the
# edge pixel, as torch.nn.functional.pad(mode='reflect')).

def _mirror(idx, size):
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - idx % period).abs()

#----------------------------------------------------------------------------
# Separable 2x up/downsampling with the sym6 filter on images of shape
# [N, C, H, W]. Sample i of the input feeds upsampled sample m through tap
# m + _OFFSET - 2 i (its content lands at m = 2 i + 0.098); the downsampling
# is the adjoint and undoes it exactly. The gains are the reference's:
# 1 / sqrt(2) per axis up, sqrt(2) down.

_PAD = len(_SYM6) // 4     # Extra output pixels on each side needed by the downsampling filter (3).
_OFFSET = len(_SYM6) // 2 - 1 # Filter tap aligned with upsampled sample m (5).

def _upsample2x(x):
    N, C, H, W = x.shape
    f = misc.constant(np.asarray(_SYM6, dtype=np.float32), dtype=x.dtype, device=x.device)
    x = x.reshape(N * C, 1, H, W)
    x = torch.nn.functional.conv_transpose2d(x, f.reshape(1, 1, 1, -1), stride=[1, 2], padding=[0, _OFFSET]) # True convolution.
    x = torch.nn.functional.conv_transpose2d(x, f.reshape(1, 1, -1, 1), stride=[2, 1], padding=[_OFFSET, 0])
    return x.reshape(N, C, H * 2, W * 2)

def _downsample2x(x):
    # Input [N, C, 2 (H + 2 _PAD), 2 (W + 2 _PAD)] -> output [N, C, H, W] (the central part).
    N, C, H2, W2 = x.shape
    f = misc.constant(np.asarray(_SYM6, dtype=np.float32), dtype=x.dtype, device=x.device)
    x = x.reshape(N * C, 1, H2, W2)[:, :, 2 * _PAD - _OFFSET:, 2 * _PAD - _OFFSET:] # Correlation, the adjoint of the upsampling.
    x = torch.nn.functional.conv2d(x, f.reshape(1, 1, 1, -1), stride=[1, 2])
    x = torch.nn.functional.conv2d(x, f.reshape(1, 1, -1, 1), stride=[2, 1])
    return x.reshape(N, C, H2 // 2 - 2 * _PAD, W2 // 2 - 2 * _PAD)

#----------------------------------------------------------------------------
# Resample images with per-image inverse affine matrices G_inv [N, 3, 3]
# that map output to input coordinates, both centred on the image centre
# ((W - 1) / 2, (H - 1) / 2) in pixel units.
#
# As in the reference, the sampling grid treats upsampled sample m as lying
# at (m + 0.5) / 2 - 0.5 and conjugates G_inv by a shift of half an
# upsampled pixel; with the filter's asymmetry this makes the transforms act
# about the point 0.049 pixels left of and above the centre ((5 - 5.098) / 2).

def _margin(G_inv, W, H):
    # Reflection padding [x0, y0, x1, y1] of the reference: 2 _PAD pixels
    # beyond the output corners mapped into the input, the largest over the
    # batch, at most size - 1 (beyond it the filters and the sampling read zeros).
    cx, cy = (W - 1) / 2, (H - 1) / 2
    device = G_inv.device
    corners = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device) # [corner, xyz]
    corners = (G_inv @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1) # [xy, N * corner]
    margin = torch.cat([-corners, corners]).max(dim=1).values # [-x, -y, x, y] extremes
    margin = margin + misc.constant([2 * _PAD - cx, 2 * _PAD - cy] * 2, device=device)
    margin = torch.minimum(margin.clamp(min=0), misc.constant([W - 1, H - 1] * 2, device=device))
    return margin.ceil()

def _extent(size, m0, m1, up=1):
    # [up (3 size - 2)] mask of the samples (upsampled by `up`) of an axis
    # padded by size - 1 on each side that lie within the padding m0, m1.
    idx = torch.arange(up * (3 * size - 2), device=m0.device)
    return ((idx >= up * (size - 1 - m0)) & (idx < up * (2 * size - 1 + m1))).to(torch.float32)

def _affine_resample(images, G_inv, full_margin=None):
    N, C, H, W = images.shape
    device = images.device
    if full_margin is None: # reading the margin back would wait for the device; on the CPU it costs nothing
        full_margin = device.type != 'cpu'

    # Pad by the margin; or pad by the most it can be and zero what lies
    # beyond it, before and after upsampling (the same images to float32
    # round-off of the sample positions).
    margin = _margin(G_inv, W, H)
    if full_margin:
        mx0, my0, mx1, my1 = W - 1, H - 1, W - 1, H - 1
        x0, y0, x1, y1 = margin.unbind()
        mask = lambda up: _extent(H, y0, y1, up)[:, None] * _extent(W, x0, x1, up)[None, :]
    else:
        mx0, my0, mx1, my1 = [int(m) for m in margin.tolist()]
    images = torch.nn.functional.pad(images, [mx0, mx1, my0, my1], mode='reflect')
    images = images * mask(1).to(images.dtype) if full_margin else images
    images = _upsample2x(images)
    images = images * mask(2).to(images.dtype) if full_margin else images

    # Sample an upsampled output extended by _PAD pixels on each side, then
    # downsample back to the output size. theta maps the output grid to the
    # input one, composed in the reference's order (the float32 round-off of
    # the sample positions shows at 1e-5).
    theta = _translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=device) @ G_inv # Centre of the padded image.
    theta = _scale2d(2, 2, device=device) @ theta @ _scale2d(1 / 2, 1 / 2, device=device) # Upsampled pixels.
    theta = _translate2d(-0.5, -0.5, device=device) @ theta @ _translate2d(0.5, 0.5, device=device)
    theta = _scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ theta # Input pixels -> grid_sample coordinates.
    theta = theta @ _scale2d(W + 2 * _PAD, H + 2 * _PAD, device=device) # Output grid -> output pixels.
    size = [N, C, (H + 2 * _PAD) * 2, (W + 2 * _PAD) * 2]
    grid = torch.nn.functional.affine_grid(theta[:, :2, :].to(images.dtype), size=size, align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _downsample2x(images)

#----------------------------------------------------------------------------
# The augmentation pipeline. Each enabled transform (multiplier > 0) is
# applied to each image with probability multiplier * p and appends its label
# columns; an image it skips gets zeros there.

@persistence.persistent_class
class AugmentPipe:
    def __init__(self,
        p                   = 1,        # Overall probability multiplier.
        xflip               = 0,        # Mirror left-right.
        yflip               = 0,        # Mirror top-bottom.
        rotate_int          = 0,        # Rotate by a whole number of quarter turns (square images).
        translate_int       = 0,        # Shift by a whole number of pixels, mirror-padded.
        translate_int_max   = 0.125,    # Largest integer shift, as a fraction of the image size.
        scale               = 0,        # Isotropic scaling.
        rotate_frac         = 0,        # Rotation by an arbitrary angle.
        aniso               = 0,        # Anisotropic scaling.
        translate_frac      = 0,        # Sub-pixel translation.
        scale_std           = 0.2,      # Log2 standard deviation of the isotropic scale.
        rotate_frac_max     = 1,        # Largest rotation, as a fraction of a half turn.
        aniso_std           = 0.2,      # Log2 standard deviation of the anisotropic scale.
        aniso_rotate_prob   = 0.5,      # Probability of a random (rather than horizontal) anisotropy axis.
        translate_frac_std  = 0.125,    # Standard deviation of the translation, as a fraction of the image size.
        brightness          = 0,        # Brightness offset.
        contrast            = 0,        # Contrast scaling.
        lumaflip            = 0,        # Luma inversion.
        hue                 = 0,        # Hue rotation.
        saturation          = 0,        # Saturation scaling.
        brightness_std      = 0.2,      # Standard deviation of the brightness offset.
        contrast_std        = 0.5,      # Log2 standard deviation of the contrast scale.
        hue_max             = 1,        # Largest hue rotation, as a fraction of a half turn.
        saturation_std      = 1,        # Log2 standard deviation of the saturation scale.
    ):
        options = dict(locals())
        del options['self']
        for name, value in options.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f'AugmentPipe option {name} must be a number, got {value!r}') from None
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f'AugmentPipe option {name} must be a finite number >= 0, got {value}')
            setattr(self, name, value)
        if self.translate_int > 0 and self.translate_int_max == 0:
            raise ValueError('AugmentPipe option translate_int_max must be > 0 when translate_int is enabled')

    def _gate(self, w, multiplier):
        # Keep w (shape [..., N]) for the images drawn to be augmented, zero elsewhere.
        keep = torch.rand([w.shape[-1]], device=w.device) < multiplier * self.p
        return torch.where(keep, w, torch.zeros_like(w))

    def __call__(self, images):
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe expects images of shape [N, C, H, W], got {list(images.shape)}')
        N, C, H, W = images.shape
        device = images.device
        if self.rotate_int > 0 and H != W:
            raise ValueError(f'AugmentPipe option rotate_int needs square images, got {H}x{W}')
        colour = [self.brightness, self.contrast, self.lumaflip, self.hue, self.saturation]
        if any(m > 0 for m in colour) and C not in (1, 3):
            raise ValueError(f'AugmentPipe colour transforms need 1 (luma) or 3 (RGB) channels, got {C}')
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: exact index operations.
        if self.xflip > 0:
            w = self._gate(torch.randint(2, [N], device=device), self.xflip)
            images = torch.where(w.reshape(N, 1, 1, 1) == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = self._gate(torch.randint(2, [N], device=device), self.yflip)
            images = torch.where(w.reshape(N, 1, 1, 1) == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:
            # w quarter turns counterclockwise as displayed (torch.rot90(images, w, dims=[2, 3])),
            # done as an x-flip (w = 1, 2), a y-flip (w = 2, 3) and a transpose (w = 1, 3).
            w = self._gate(torch.randint(4, [N], device=device), self.rotate_int).reshape(N, 1, 1, 1)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            # Content moves right by tx and up by ty pixels; the image is mirrored at its edges.
            w = self._gate(torch.rand([2, N], device=device) * 2 - 1, self.translate_int)
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            x = _mirror(torch.arange(W, device=device)[None, :] - tx[:, None], W) # [N, W]
            y = _mirror(torch.arange(H, device=device)[None, :] + ty[:, None], H) # [N, H]
            images = images.gather(3, x.reshape(N, 1, 1, W).expand(N, C, H, W))
            images = images.gather(2, y.reshape(N, 1, H, 1).expand(N, C, H, W))
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # General geometric transforms, composed into one inverse matrix that
        # maps output pixel positions to input ones (about the image centre).
        # The forward transform scales, then rotates, then stretches, then translates.
        G_inv = None
        geometric = [self.scale, self.rotate_frac, self.aniso, self.translate_frac]
        if any(m > 0 for m in geometric):
            G_inv = torch.eye(3, device=device).repeat(N, 1, 1)
        if self.scale > 0:
            # Magnify by 2^(w scale_std).
            w = self._gate(torch.randn([N], device=device), self.scale)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ _scale2d(1 / s, 1 / s, device=device)
            labels += [w]
        if self.rotate_frac > 0:
            # Rotate counterclockwise (as displayed) by w.
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = self._gate(w, self.rotate_frac)
            G_inv = G_inv @ _rotate2d(w, device=device)
            labels += [torch.cos(w) - 1, torch.sin(w)]
        if self.aniso > 0:
            # Stretch by 2^(w aniso_std) along the axis at angle r counterclockwise
            # from the x axis (as displayed), and by the inverse across it.
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = self._gate(w, self.aniso)
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ _rotate2d(-r, device=device) @ _scale2d(1 / s, s, device=device) @ _rotate2d(r, device=device)
            labels += [w * torch.cos(r), w * torch.sin(r)]
        if self.translate_frac > 0:
            # Content moves right by w_x W translate_frac_std and down by w_y H translate_frac_std pixels.
            w = self._gate(torch.randn([2, N], device=device), self.translate_frac)
            G_inv = G_inv @ _translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std), device=device)
            labels += [w[0], w[1]]
        if G_inv is not None and any(m * self.p > 0 for m in geometric):
            images = _affine_resample(images, G_inv)

        # Colour transforms, composed into one 4x4 matrix acting on (R, G, B, 1).
        M = None
        luma = np.asarray([1, 1, 1, 0]) / np.sqrt(3) # Unit vector along grey, in (R, G, B, 1).
        luma_axis = misc.constant(luma, device=device)
        I_4 = torch.eye(4, device=device)
        if any(m > 0 for m in colour):
            M = I_4.repeat(N, 1, 1)
        if self.brightness > 0:
            # Add w brightness_std.
            w = self._gate(torch.randn([N], device=device), self.brightness)
            b = w * self.brightness_std
            M = _translate3d(b, b, b, device=device) @ M
            labels += [w]
        if self.contrast > 0:
            # Multiply by 2^(w contrast_std).
            w = self._gate(torch.randn([N], device=device), self.contrast)
            c = torch.exp2(w * self.contrast_std)
            M = _scale3d(c, c, c, device=device) @ M
            labels += [w]
        if self.lumaflip > 0:
            # Negate the luma component (w = 1).
            w = self._gate(torch.randint(2, [N], device=device), self.lumaflip)
            M = (I_4 - 2 * torch.outer(luma_axis, luma_axis) * w.reshape(N, 1, 1)) @ M
            labels += [w]
        if self.hue > 0:
            # Rotate colours by w about the luma axis.
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = self._gate(w, self.hue)
            M = _rotate3d(luma, w, device=device) @ M
            labels += [torch.cos(w) - 1, torch.sin(w)]
        if self.saturation > 0:
            # Scale the chroma (the part orthogonal to the luma axis) by 2^(w saturation_std).
            w = self._gate(torch.randn([N], device=device), self.saturation)
            P = torch.outer(luma_axis, luma_axis)
            M = (P + (I_4 - P) * torch.exp2(w * self.saturation_std).reshape(N, 1, 1)) @ M
            labels += [w]
        if M is not None and any(m * self.p > 0 for m in colour):
            M = M.to(images.dtype)
            images = images.reshape(N, C, H * W)
            if C == 3:
                images = M[:, :3, :3] @ images + M[:, :3, 3:]
            else: # Luma: the average of the RGB rows applied to a grey pixel (v, v, v).
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            images = images.reshape(N, C, H, W)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

#----------------------------------------------------------------------------
