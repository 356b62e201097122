"""Batched view generation on the training device, with per-sample random parameters.

At high compression a ViT step gets several times cheaper, while lightly's per-image PIL transforms
cost the same per view and run on the CPU: on small machines they, not the ViT, then set the pace
(docs/performance.md). With `data.augment: device` the loader only decodes and
resizes images (or only reads JPEG bytes from shards), and this module draws every view of a batch
at once, on the GPU (or CPU) that trains: random resized crop and horizontal flip (two 1-D
bilinear passes, the samples of an affine `grid_sample`), colour jitter (brightness, contrast,
saturation, hue), random grayscale, Gaussian blur, solarization, and normalisation.

Each image gets its own parameters, drawn on the CPU from a generator seeded per step, so the stream
stays a pure function of (seed, step, process) and the device never has to report which images are
blurred (no host sync). Colour operations are per-image 3x3 matrices, and an image left alone gets
the identity, so no `where` computes a view twice. On a CPU the views are made a few images at a
time, so that each of their passes runs in cache.

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
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert('L')
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
# images per chunk on a CPU: a chunk's views of 224 px (about 5 MB) stay in cache across passes
CPU_CHUNK = 8


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


@dataclass(frozen=True)
class ViewDraw:
    """One view's random parameters for every image of a batch, on the CPU."""

    extent: torch.Tensor  # (n, 2) each image's own height and width
    boxes: torch.Tensor  # (n, 4) crop boxes x0, y0, x1, y1 in pixels
    flip: torch.Tensor  # (n,) bool
    brightness: torch.Tensor  # (n,) factors, 1 where not jittered
    contrast: torch.Tensor  # (n,) factors, 1 where not jittered
    saturation: torch.Tensor  # (n, 3, 3) colour matrices, the identity where not jittered
    hue: torch.Tensor  # (n, 3, 3)
    gray: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) blur widths in pixels
    blur: torch.Tensor  # (n,) bool
    solarize: torch.Tensor  # (n,) bool

    def __getitem__(self, rows: slice) -> ViewDraw:
        return ViewDraw(**{k: v[rows] for k, v in self.__dict__.items()})


def draw_view(n: int, height, width, spec: ViewSpec, generator: torch.Generator) -> ViewDraw:
    """The parameters of one view of `n` images of `height` x `width` (ints, or (n,) tensors)."""

    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=generator)

    def coin(p: float) -> torch.Tensor:
        return uniform() < p

    def factor(strength: float) -> torch.Tensor:
        return (1 - strength + 2 * strength * uniform()).clamp_min(0)

    boxes = crop_boxes(n, height, width, spec.scale, spec.ratio, generator)
    flip = coin(spec.hflip)
    jittered = coin(spec.jitter)
    brightness, contrast, saturation = factor(spec.brightness), factor(spec.contrast), factor(spec.saturation)
    angle = (2 * uniform() - 1) * spec.hue * 2 * math.pi
    gray = coin(spec.gray)
    sigma = spec.sigma[0] + (spec.sigma[1] - spec.sigma[0]) * uniform()
    blur = coin(spec.blur)
    solarize = coin(spec.solarize)
    one, eye = torch.ones(n), torch.eye(3).expand(n, 3, 3)
    chosen = jittered[:, None, None]
    return ViewDraw(
        extent=torch.stack([torch.as_tensor(height).expand(n), torch.as_tensor(width).expand(n)], 1),
        boxes=boxes,
        flip=flip,
        brightness=torch.where(jittered, brightness, one),
        contrast=torch.where(jittered, contrast, one),
        saturation=torch.where(chosen, saturation_matrix(saturation), eye),
        hue=torch.where(chosen, hue_matrix(angle), eye),
        gray=gray,
        sigma=sigma,
        blur=blur,
        solarize=solarize,
    )


def saturation_matrix(factor: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3): gray + factor * (rgb - gray) as one matrix per image."""
    return factor[:, None, None] * torch.eye(3) + (1 - factor)[:, None, None] * LUMA.expand(3, 3)


def hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3): each image's chroma (I, Q of YIQ) rotated by `angle` radians; luma is kept."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(angle), 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    return _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ


def make_views(images, specs: list[ViewSpec], generator: torch.Generator) -> list[torch.Tensor]:
    """Views of a batch: `images` (B, 3, H, W) uint8, or a list of (3, H, W) uint8 images of
    different sizes -> one normalised (B, 3, s, s) float per spec. Crops are drawn inside each
    image's own extent."""
    n = len(images)
    sizes = torch.tensor([i.shape[-2:] for i in images])
    height, width = sizes.max(0).values.tolist()
    draws = [draw_view(n, sizes[:, 0], sizes[:, 1], spec, generator) for spec in specs]
    # as a whole batch would: the widest blur of the batch sets every image's kernel support
    radii = [blur_radius(draw.sigma, spec.size) for spec, draw in zip(specs, draws, strict=True)]
    device = images[0].device
    views = [torch.empty(n, 3, spec.size, spec.size, device=device) for spec in specs]
    chunk = CPU_CHUNK if device.type == "cpu" else n
    # one chunk at a time in one float buffer, in [0, 255] (the 1/255 rides on the brightness
    # factor): fresh memory costs a page fault per page, more than the conversion itself
    buffer = torch.empty(min(chunk, n), 3, height, width, device=device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        source = pad_into(buffer, images[rows])
        for spec, draw, radius, view in zip(specs, draws, radii, views, strict=True):
            render(source, draw[rows], spec.size, radius, out=view[rows])
    return views


def pad_into(buffer: torch.Tensor, images) -> torch.Tensor:
    """`images` into the first rows of `buffer`, top left; the crops never read past each image's
    own extent, so the rest stays as it is."""
    if isinstance(images, torch.Tensor) and images.shape[-2:] == buffer.shape[-2:]:
        return buffer[: len(images)].copy_(images)
    for b, image in enumerate(images):
        buffer[b, :, : image.shape[-2], : image.shape[-1]] = image
    return buffer[: len(images)]


def render(source: torch.Tensor, draw: ViewDraw, size: int, radius: int, out=None) -> torch.Tensor:
    """One view of each image of `source` (B, 3, H, W) float in [0, 255], normalised (into `out`)."""
    device, luma = source.device, LUMA.to(source.device)
    v = resized_crops(source, draw.boxes, size, draw.flip, draw.extent)
    v.mul_(_on(device, draw.brightness / 255)[:, None, None, None]).clamp_(0, 1)
    contrast = _on(device, draw.contrast)[:, None, None, None]
    mean = (v.mean(dim=(2, 3)) @ luma)[:, None, None, None]
    v.mul_(contrast).add_((1 - contrast) * mean).clamp_(0, 1)
    v = _colour(v, _on(device, draw.saturation)).clamp_(0, 1)
    v = _colour(v, _on(device, draw.hue)).clamp_(0, 1)
    v = _where(draw.gray, v, lambda u, rows: (u * luma[:, None, None]).sum(1, keepdim=True).expand_as(u))
    v = _where(draw.blur, v, lambda u, rows: gaussian_blur(u, draw.sigma[rows], radius))
    v = _where(draw.solarize, v, lambda u, rows: torch.where(u >= 0.5, 1 - u, u))
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return torch.div(v.sub_(mean), std, out=out)


def _on(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def _colour(v: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Each image's pixels through its own (3, 3) colour matrix."""
    return torch.bmm(matrices, v.flatten(2)).view_as(v)


def _where(chosen: torch.Tensor, v: torch.Tensor, fn) -> torch.Tensor:
    """`v` with `fn` applied to the images `chosen` (a CPU mask) only: the others cost nothing, and
    which are chosen is known without asking the device."""
    rows = chosen.nonzero()[:, 0]
    if len(rows):
        on_device = _on(v.device, rows)
        v.index_copy_(0, on_device, fn(v.index_select(0, on_device), rows))
    return v


def crop_boxes(n, height, width, scale, ratio, generator) -> torch.Tensor:
    """(n, 4) boxes (x0, y0, x1, y1) in pixels, sampled as torchvision's RandomResizedCrop does;
    `height`, `width`: of every image (ints) or of each ((n,) tensors)."""
    tries = 10
    height = torch.as_tensor(height, dtype=torch.float32).expand(n)
    width = torch.as_tensor(width, dtype=torch.float32).expand(n)
    area = (height * width)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((n, tries), generator=generator))
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        (n, tries), generator=generator
    )
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first = torch.argmax(ok.int(), dim=1)  # the first valid try, as torchvision takes it
    found = ok.any(dim=1)
    w = torch.where(found, w.gather(1, first[:, None])[:, 0], width)
    h = torch.where(found, h.gather(1, first[:, None])[:, 0], height)
    x0 = ((width - w + 1) * torch.rand(n, generator=generator)).floor()
    y0 = ((height - h + 1) * torch.rand(n, generator=generator)).floor()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def resized_crops(
    x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor, extent: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each image to its box (CPU) and resize it to `size` (bilinear), mirrored where `flip`;
    `extent` (n, 2): each image's own height and width where `x` pads them (default: all of `x`).

    What `grid_sample` with an affine grid computes (align_corners=False, border padding at each
    image's own border), done as two 1-D passes, rows then columns: faster on a CPU, and no grid."""
    if extent is None:
        extent = torch.tensor([x.shape[-2:]]).expand(len(x), 2)
    n, c, height, width = x.shape
    y0, y1, wy = _taps(boxes[:, 1], boxes[:, 3], size, extent[:, 0])
    x0, x1, wx = (
        torch.where(flip[:, None], t.flip(1), t) for t in _taps(boxes[:, 0], boxes[:, 2], size, extent[:, 1])
    )
    y0, y1, wy, x0, x1, wx = (_on(x.device, t) for t in (y0, y1, wy, x0, x1, wx))

    planes = (torch.arange(n * c, device=x.device) * height).view(n, c, 1)

    def rows(index: torch.Tensor) -> torch.Tensor:  # whole rows, copied as such: faster than a gather
        return (
            x.reshape(n * c * height, width)
            .index_select(0, (planes + index[:, None]).flatten())
            .view(n, c, size, width)
        )

    def columns(index: torch.Tensor) -> torch.Tensor:
        return resized.gather(3, index[:, None, None, :].expand(n, c, size, size))

    resized = rows(y0).lerp_(rows(y1), wy[:, None, :, None])
    return columns(x0).lerp_(columns(x1), wx[:, None, None, :])


def _taps(lo: torch.Tensor, hi: torch.Tensor, size: int, length: torch.Tensor):
    """Each output pixel's two source indices and the weight of the second, along one axis of
    images `length` (n,) long."""
    last = (length - 1)[:, None].float()
    at = torch.minimum(lo[:, None] + (hi - lo)[:, None] * ((torch.arange(size) + 0.5) / size) - 0.5, last)
    at = at.clamp_min(0)
    first = at.floor()
    return first.long(), torch.minimum(first + 1, last).long(), at - first


def blur_radius(sigma: torch.Tensor, size: int) -> int:
    """Kernel radius: 3 sigma of the widest blur, within what reflect padding of `size` allows."""
    return max(1, min(int(math.ceil(3 * float(sigma.max()))), (size - 1) // 2))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-image `sigma` (B,) in pixels (kernel radius 3 sigma),
    reflect-padded as torchvision's. A sum of shifted copies: a depthwise convolution with one
    kernel per image runs several times slower on a CPU."""
    n, c, h, w = x.shape
    radius = blur_radius(sigma, min(h, w)) if radius is None else radius
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma.float().cpu()[:, None] ** 2))
    taps = _on(x.device, (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)).T[:, :, None, None, None]
    for dim, length in ((-1, w), (-2, h)):
        padded = F.pad(x, (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius), mode="reflect")
        x = padded.narrow(dim, 0, length) * taps[0]
        for k in range(1, 2 * radius + 1):
            x.addcmul_(padded.narrow(dim, k, length), taps[k])
    return x


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one step's augmentations on one process: a function of (seed, step, rank).
    It lives on the CPU whatever the device, so a GPU run draws the same views as a CPU run."""
    generator = torch.Generator()
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


def batch_views(
    loaded: list, specs: list[ViewSpec] | None, seed: int, step: int, rank: int, device
) -> list[torch.Tensor]:
    """The views of one loaded batch on `device`: as loaded, or drawn from the base images there
    (JPEG bytes, a list, are decoded there first, the whole batch at once)."""
    generator = step_generator(seed, step, rank) if specs is not None else None
    if isinstance(loaded[0], list):
        return make_views(decode_batch(loaded[0], device), specs, generator)
    loaded = [v.to(device, non_blocking=True) for v in loaded]
    if specs is None:
        return loaded
    return make_views(loaded[0], specs, generator)
