"""Opening one image file as 8-bit RGB, the way every reader of image files in accelvit does."""

from __future__ import annotations

import numpy as np
from PIL import Image

from accelvit.config import ConfigError


class BadImageError(ConfigError):
    """An image file that cannot be decoded; `str()` is 'PATH: reason'.

    Training skips such files (`data.on_bad_file`); evaluation stops with this one-line error.
    """


SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # PIL's modes of 16-bit grey images (PNG, TIFF)


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            if image.mode in SIXTEEN_BIT:  # PIL's convert clips these to 8 bits; scale them instead
                values = np.asarray(image, dtype=np.float64) / 257.0
                return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unreadable or truncated files
        raise BadImageError(f"{path}: {exc}") from None
