"""DDPO's JPEG (in)compressibility rewards (no weights).

size(x) = bytes of x encoded by PIL as JPEG at quality 95 (default settings otherwise), divided by 1000 (kB).
compressibility = −size(x), incompressibility = +size(x).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

JPEG_QUALITY = 95


def jpeg_kilobytes(images: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    sizes = []
    for image in np.asarray(images, dtype=np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.array(sizes, dtype=np.float32)


class JpegReward:
    def __init__(self, sign: float, quality: int = JPEG_QUALITY):
        self.sign, self.quality = sign, quality

    def __call__(self, images: np.ndarray, metas: list[dict]) -> np.ndarray:
        return (self.sign * jpeg_kilobytes(images, self.quality)).astype(np.float32)


def jpeg_compressibility(quality: int = JPEG_QUALITY) -> JpegReward:
    return JpegReward(-1.0, quality)


def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> JpegReward:
    return JpegReward(1.0, quality)
