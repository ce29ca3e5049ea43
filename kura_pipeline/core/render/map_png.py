"""A small PNG of the 2-D map for the Dagster UI, drawn with numpy and written with zlib.

No plotting library is needed for a few thousand coloured dots, and the result is the same on
every machine (no fonts, no backend).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

BACKGROUND = (255, 255, 255)


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def png_bytes(image: np.ndarray) -> bytes:
    """An (height, width, 3) uint8 array as PNG: 8-bit RGB, no filtering."""
    height, width, _ = image.shape
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def scatter_png(
    x: np.ndarray,
    y: np.ndarray,
    colours: np.ndarray,
    width: int = 560,
    height: int = 360,
    dot: int = 2,
    seed: int = 0,
) -> bytes:
    """Dots at (x, y), each in its (r, g, b) colour, fitted into the image with equal scales."""
    image = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    if len(x) == 0:
        return png_bytes(image)
    margin = 8 + dot
    span = max(float(np.ptp(x)), float(np.ptp(y)), 1e-9)
    scale = min((width - 2 * margin) / span, (height - 2 * margin) / span)
    # Centre the cloud; y grows upwards on the map and downwards in the image.
    px = ((x - x.min()) * scale + (width - np.ptp(x) * scale) / 2).astype(int)
    py = (height - 1 - ((y - y.min()) * scale + (height - np.ptp(y) * scale) / 2)).astype(int)
    # Random drawing order, so no cluster is always painted over the others.
    order = np.random.default_rng(seed).permutation(len(x))
    for dx in range(-dot + 1, dot):
        for dy in range(-dot + 1, dot):
            xs = np.clip(px[order] + dx, 0, width - 1)
            ys = np.clip(py[order] + dy, 0, height - 1)
            image[ys, xs] = colours[order]
    return png_bytes(image)


def swatch_png(colour: str, size: int = 12) -> bytes:
    """A square of one colour: a legend key for a markdown table."""
    return png_bytes(np.full((size, size, 3), hex_to_rgb(colour), dtype=np.uint8))
