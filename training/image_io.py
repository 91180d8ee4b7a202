"""Images as files: [-1, 1] tensors to 8-bit pixels, one PNG per image,
image grids, and reading them back."""

import math

import numpy as np
import PIL.Image
import torch

import dnnlib

#----------------------------------------------------------------------------

def images_to_uint8(images):
    """[N, C, H, W] images in [-1, 1] -> uint8 numpy [N, H, W, C] (pixel = clip(x * 127.5 + 128, 0, 255))."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_image(image, path):
    """Write one uint8 [H, W, C] image as a PNG ('L' for one channel, else 'RGB'), atomically."""
    picture = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with dnnlib.util.atomic_path(path) as tmp:
        picture.save(tmp, format='PNG')

def read_image(path):
    """uint8 [H, W, C] pixels of an image file."""
    with PIL.Image.open(path) as picture:
        image = np.array(picture)
    return image.reshape(*image.shape[:2], -1)

def grid_size_for(num_images):
    """(grid_w, grid_h) as close to square as possible, e.g. 64 -> (8, 8), 6 -> (3, 2)."""
    grid_w = max(math.ceil(math.sqrt(num_images)), 1)
    return grid_w, max(math.ceil(num_images / grid_w), 1)

def save_image_grid(images, path, grid_size=None, scale=1, gap=0):
    """Write uint8 [N, H, W, C] images as one PNG, in rows of grid_w (empty cells black), atomically.
    Each image is upscaled `scale` times (nearest neighbour); `gap` white pixels separate the cells."""
    images = np.asarray(images)
    grid_w, grid_h = grid_size if grid_size is not None else grid_size_for(len(images))
    if len(images) > grid_w * grid_h:
        raise ValueError(f'{len(images)} images do not fit a {grid_w}x{grid_h} grid')
    if int(scale) != scale or scale < 1 or int(gap) != gap or gap < 0:
        raise ValueError(f'grid scale must be a positive integer and gap a non-negative one, got {scale!r} and {gap!r}')
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    _N, H, W, C = images.shape
    cells = np.zeros([grid_h * grid_w, H, W, C], dtype=np.uint8)
    cells[:len(images)] = images
    grid = np.full([grid_h, H + gap, grid_w, W + gap, C], 255, dtype=np.uint8)
    grid[:, :H, :, :W] = cells.reshape(grid_h, grid_w, H, W, C).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(grid_h * (H + gap), grid_w * (W + gap), C)[:grid_h * (H + gap) - gap, :grid_w * (W + gap) - gap]
    save_image(np.ascontiguousarray(grid), path)

#----------------------------------------------------------------------------
