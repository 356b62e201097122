"""Batched view generation on the training device, with per-sample random parameters.

At high compression a ViT step gets several times cheaper, while lightly's per-image PIL transforms
cost the same per view and run on the CPU: on small machines they, not the ViT, then set the pace
(see the README's Performance section). With `data.augment: device` the loader only decodes and
resizes images, and this module draws every view of a batch at once, on the GPU (or CPU) that
trains: random resized crop and horizontal flip (one affine `grid_sample`), colour jitter
(brightness, contrast, saturation, hue), random grayscale, Gaussian blur, solarization, and
normalisation. Each image gets its own parameters, drawn from a generator seeded per step, so the
stream stays a pure function of (seed, step, process).

Differences from the torchvision/lightly PIL pipeline: the jitter operations run in a fixed order
(brightness, contrast, saturation, hue) instead of a random one; hue is a rotation of the chroma
plane in YIQ space; crops that find no valid box in 10 tries take the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """The random transform of one view (defaults: lightly's SimCLRTransform)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    gray: float = 0.2
    blur: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0


def make_views(
    images: torch.Tensor, specs: list[ViewSpec], generator: torch.Generator, sizes: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Views of a batch: `images` (B, 3, H, W) uint8 -> one normalised (B, 3, s, s) float per spec.

    `sizes` (B, 2): each image's own height and width where the batch pads images of different
    sizes (`pad_batch`); crops are then drawn inside each image's extent.
    """
    x = images.float() / 255
    return [make_view(x, spec, generator, sizes) for spec in specs]


def make_view(
    x: torch.Tensor, spec: ViewSpec, generator: torch.Generator, sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """One view of every image of `x` (B, 3, H, W) in [0, 1], normalised with ImageNet statistics."""
    n = x.shape[0]

    def coin(p: float) -> torch.Tensor:
        return _uniform(n, generator, x.device) < p

    height, width = (x.shape[-2], x.shape[-1]) if sizes is None else (sizes[:, 0], sizes[:, 1])
    boxes = crop_boxes(n, height, width, spec.scale, spec.ratio, generator, x.device)
    v = resized_crops(x, boxes, spec.size, flip=coin(spec.hflip))
    v = color_jitter(v, spec, coin(spec.jitter), generator)
    v = torch.where(coin(spec.gray)[:, None, None, None], grayscale(v).expand_as(v), v)
    sigma = spec.sigma[0] + (spec.sigma[1] - spec.sigma[0]) * _uniform(n, generator, x.device)
    v = torch.where(coin(spec.blur)[:, None, None, None], gaussian_blur(v, sigma), v)
    v = torch.where(coin(spec.solarize)[:, None, None, None] & (v >= 0.5), 1 - v, v)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (v - mean) / std


def crop_boxes(n, height, width, scale, ratio, generator, device) -> torch.Tensor:
    """(n, 4) boxes (x0, y0, x1, y1) in pixels, sampled as torchvision's RandomResizedCrop does;
    `height`, `width`: of every image (ints) or of each ((n,) tensors)."""
    tries = 10
    height = torch.as_tensor(height, dtype=torch.float32, device=device).expand(n)
    width = torch.as_tensor(width, dtype=torch.float32, device=device).expand(n)
    area = (height * width)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * _uniform((n, tries), generator, device))
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _uniform(
        (n, tries), generator, device
    )
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first = torch.argmax(ok.int(), dim=1)  # the first valid try, as torchvision takes it
    found = ok.any(dim=1)
    w = torch.where(found, w.gather(1, first[:, None])[:, 0], width)
    h = torch.where(found, h.gather(1, first[:, None])[:, 0], height)
    x0 = ((width - w + 1) * _uniform(n, generator, device)).floor()
    y0 = ((height - h + 1) * _uniform(n, generator, device)).floor()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box and resize it to `size` (bilinear), mirrored where `flip`."""
    n, _, height, width = x.shape
    cx = (boxes[:, 0] + boxes[:, 2]) / width - 1  # box centre in [-1, 1]
    cy = (boxes[:, 1] + boxes[:, 3]) / height - 1
    sx = (boxes[:, 2] - boxes[:, 0]) / width
    sy = (boxes[:, 3] - boxes[:, 1]) / height
    sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma with ITU-R 601 weights, as PIL's convert('L')."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 1)


def color_jitter(x: torch.Tensor, spec: ViewSpec, apply: torch.Tensor, generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-image factors, where `apply`."""
    n = x.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return (1 - strength + 2 * strength * _uniform(n, generator, x.device)).clamp_min(0)[
            :, None, None, None
        ]

    v = (x * factor(spec.brightness)).clamp(0, 1)
    mean = grayscale(v).mean(dim=(1, 2, 3), keepdim=True)
    v = (mean + factor(spec.contrast) * (v - mean)).clamp(0, 1)
    gray = grayscale(v)
    v = (gray + factor(spec.saturation) * (v - gray)).clamp(0, 1)
    angle = (2 * _uniform(n, generator, x.device) - 1) * spec.hue * 2 * math.pi
    v = rotate_hue(v, angle).clamp(0, 1)
    return torch.where(apply[:, None, None, None], v, x)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image's chroma (I, Q) by `angle` (B,) radians; luma is kept."""
    to_yiq = _RGB_TO_YIQ.to(x.device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image `sigma` (B,) in pixels (kernel radius 3 sigma)."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    weight = kernel.repeat_interleave(c, dim=0)  # one kernel per image and channel
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weight[:, None, None, :], groups=n * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, radius, radius), mode="reflect"), weight[:, None, :, None], groups=n * c
    )
    return flat.reshape(n, c, h, w)


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one step's augmentations on one process: a function of (seed, step, rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return generator


class BaseImage:
    """What the loader does per image when views are drawn on the device: PIL -> [(3, size, size) uint8].

    It draws no random numbers, so the loader need not seed it per sample (`deterministic`).
    """

    deterministic = True

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image) -> list[torch.Tensor]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        if isinstance(image, torch.Tensor):  # JPEG bytes (shards): decoded with the batch, on the device
            return [image]
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return [pil_to_tensor(image)]


def decode_batch(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> (3, H, W) uint8 images on `device`, the whole batch in one call (nvJPEG on a GPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return decode_jpeg(encoded, mode=ImageReadMode.RGB)


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes -> one (B, 3, Hmax, Wmax) batch and their (B, 2) heights and
    widths, so that crops are drawn inside each image's own extent. Each image's last row and
    column fill its padding, so the bilinear resampling at its border reads no foreign pixels (as
    `grid_sample`'s border padding does for a batch of one size)."""
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    batch = images[0].new_empty(len(images), 3, height, width)
    for b, image in enumerate(images):
        h, w = image.shape[-2:]
        batch[b, :, :h, :w] = image
        batch[b, :, :h, w:] = image[:, :, -1:]
        batch[b, :, h:, :] = batch[b, :, h - 1 : h, :]
    sizes = torch.tensor([[i.shape[-2], i.shape[-1]] for i in images], device=batch.device)
    return batch, sizes


def batch_views(
    loaded: list, specs: list[ViewSpec] | None, seed: int, step: int, rank: int, device
) -> list[torch.Tensor]:
    """The views of one loaded batch on `device`: as loaded, or drawn from the base images there
    (JPEG bytes, a list, are decoded there first, the whole batch at once)."""
    generator = step_generator(seed, step, rank, device) if specs is not None else None
    if isinstance(loaded[0], list):
        images, sizes = pad_batch(decode_batch(loaded[0], device))
        return make_views(images, specs, generator, sizes)
    loaded = [v.to(device, non_blocking=True) for v in loaded]
    if specs is None:
        return loaded
    return make_views(loaded[0], specs, generator)
