"""JUMP image pipeline: 16-bit channel TIFF -> optional illumination correction -> x1/f nearest downscale ->
per-channel clip at the top-0.01 % intensity -> 8-bit, as the CS-ARM-BN protocol prepares JUMP images
(ml-jku/cs-arm-bn preprocess/images/04-download_images_aws.py).

Details kept from that script: the clip value is the n-th largest pixel of the downscaled channel,
n = round(H*W*1e-4); pixels are scaled by 255/clip, values above 255 saturate, and the cast to uint8
truncates (no rounding). Differences, deliberate: n is at least 1 (their n = 0 for images under
5,000 pixels selects the minimum), and an all-zero channel stays zero (theirs divides by zero).
[U] their downscale is pyvips `resize(1/2, kernel="nearest")`; which of each 2x2 block's pixels it keeps is
not verified here — we keep the top-left one (`img[::f, ::f]`, odd sizes round up).
[U] illumination correction (`--illum`) divides by CellProfiler's `_Illum<Channel>.npy` function
(typical JUMP use, not checked in the pipelines); CS-ARM-BN itself does not apply it.
"""

from __future__ import annotations

import io

import numpy as np

from .raw_io import DecodeError

TOP_FRACTION = 1e-4  # top 0.01 % of pixels


def downscale(img: np.ndarray, factor: int) -> np.ndarray:
    return img if factor == 1 else img[::factor, ::factor]


def clip_value(img: np.ndarray, top_fraction: float = TOP_FRACTION) -> float:
    """The n-th largest pixel value, n = max(1, round(H*W*top_fraction))."""
    n = max(1, int(np.around(img.size * top_fraction)))
    return float(np.partition(img, img.size - n, axis=None)[img.size - n])


def to_uint8(img: np.ndarray, clip: float) -> np.ndarray:
    if clip <= 0:
        return np.zeros(img.shape, dtype=np.uint8)
    scaled = (img.astype(np.float64) * (img > 0)) * (255.0 / clip)
    scaled[scaled > 255] = 255
    return scaled.astype(np.uint8)


def load_illum(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DecodeError(f"not a readable .npy illumination function ({exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise DecodeError(f"illumination function has shape {arr.shape} and dtype {arr.dtype}, expected a 2-D "
                          f"numeric array")
    return arr.astype(np.float64)


def channel_to_uint8(raw: np.ndarray, *, factor: int, illum: np.ndarray | None = None) -> np.ndarray:
    """One raw channel (native size) -> downscaled uint8 per the CS-ARM-BN protocol."""
    img = raw
    if illum is not None:
        if illum.shape != raw.shape:
            raise DecodeError(f"illumination function is {illum.shape[0]}x{illum.shape[1]}, image is "
                              f"{raw.shape[0]}x{raw.shape[1]}")
        with np.errstate(divide="ignore", invalid="ignore"):
            img = raw.astype(np.float64) / illum
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    img = downscale(img, factor)
    return to_uint8(img, clip_value(img))


def downscaled_shape(h: int, w: int, factor: int) -> tuple[int, int]:
    return -(-h // factor), -(-w // factor)
