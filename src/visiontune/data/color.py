"""torchvision's hue shift for uint8 images, computed in cheaper operations.

``torchvision.transforms.v2.functional.adjust_hue_image`` is most of the colour jitter's cost
on a CPU (BENCHMARKS.md, *Levers*): its RGB -> HSV -> RGB round trip reduces over channels
with ``aminmax``, selects with boolean masks, ``fmod``/``remainder`` and an index table, which
are many times slower per element than plain arithmetic on a CPU.
``adjust_hue`` runs the same float32 arithmetic with plain numpy operations: selections are
bitwise (``where`` and fancy indexing branch per element), ``fmod``/``remainder`` by 1 become
subtractions that are exact on the ranges involved, and divisions by a masked denominator
become divisions by ``max(x, smallest subnormal)``, equal wherever it matters. Every float32
operation that produces a pixel's value is the same, so the output is identical to the bit
(``tests/data/test_transforms.py`` compares the two on every colour of a dense grid), in
about a third of the time.
"""

from __future__ import annotations

import numpy as np
import torch

_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)
_ONE, _TWO, _FOUR, _SIX = (np.float32(v) for v in (1.0, 2.0, 4.0, 6.0))
# to_dtype_image's float -> uint8 factor (the largest value stays 255 without rounding).
_TO_UINT8 = np.float32(255.0 + 1.0 - 1e-3)
# Which of (v, p, q, t) each output channel takes in HSV sectors 0..5 (torchvision's table)...
_SECTOR_SOURCES = (
    (0, 2, 1, 1, 3, 0),  # red
    (3, 0, 0, 2, 1, 1),  # green
    (1, 1, 3, 0, 0, 2),  # blue
)
# ... as, per channel, (source, the sectors that take it).
_CHANNEL_PLANS = tuple(
    tuple((source, tuple(k for k, used in enumerate(sources) if used == source))
          for source in sorted(set(sources)))
    for sources in _SECTOR_SOURCES
)


def _bits(mask: np.ndarray, dtype=np.int32) -> np.ndarray:
    """A boolean mask as all-ones / all-zeros integers of ``dtype``, for branch-free selection."""
    return np.negative(mask.view(np.int8)).astype(dtype, copy=False)  # True -> -1: every bit set


def _select(bits: np.ndarray, if_set: np.ndarray, otherwise: np.ndarray) -> np.ndarray:
    """``where(mask, if_set, otherwise)`` for float32 arrays, bit for bit."""
    chosen = (if_set.view(np.int32) & bits) | (otherwise.view(np.int32) & ~bits)
    return chosen.view(np.float32)


def supports(image: torch.Tensor) -> bool:
    """Whether ``adjust_hue`` takes ``image``: a uint8 RGB image (3, H, W)."""
    return image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3


def adjust_hue(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """Shift the hue of a uint8 RGB image (3, H, W) by ``hue_factor`` turns, in [-0.5, 0.5].
    Same output as ``torchvision.transforms.v2.functional.adjust_hue_image``."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if not supports(image):
        raise TypeError("adjust_hue takes a uint8 (3, H, W) image")
    if image.numel() == 0:
        return image
    pixels = image.numpy()
    x = pixels.astype(np.float32, order="C")  # channel planes, whatever the strides
    x *= np.float32(1.0 / 255)
    r, g, b = x

    # RGB -> HSV, as torchvision's _rgb_to_hsv (after Pillow).
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    spread = maxc - minc
    # Torchvision divides by 1 where maxc == minc; the numerators are 0 there, and the
    # divisors are 0 there only, so max(., tiny) gives the same quotients.
    s = spread / np.maximum(maxc, _TINY)
    divisor = np.maximum(spread, _TINY)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    max_is_r = _bits(maxc == r)
    max_is_g = _bits(maxc == g)
    h = _select(max_is_r, bc - gc, _select(max_is_g, (rc + _TWO) - bc, (gc + _FOUR) - rc))
    h *= np.float32(1.0 / 6.0)
    h += _ONE
    # fmod(h, 1) with h in [5/6, 11/6): subtracting 1 (or 0) is exact there.
    h -= (h >= _ONE).astype(np.float32)
    h += np.float32(hue_factor)
    # remainder(h, 1) with h in [-1/2, 3/2): h - floor(h) rounds as fmod-then-add-1 does.
    h -= np.floor(h)

    # HSV -> RGB, as torchvision's _hsv_to_rgb.
    h *= _SIX
    sector = np.floor(h)
    f = h - sector
    v = maxc
    sxf = s * f
    one_minus_s = _ONE - s
    q = (_ONE - sxf) * v
    t = (sxf + one_minus_s) * v
    p = one_minus_s * v
    for value in (q, t, p):  # clamp to [0, 1], in place
        np.minimum(value, _ONE, out=value)
        np.maximum(value, 0, out=value)
    # Converting to uint8 before selecting gives the same bytes, and selections on bytes are
    # four times cheaper than on float32.
    values = [(value * _TO_UINT8).astype(np.uint8) for value in (v, p, q, t)]
    sector = sector.astype(np.uint8)
    in_sector = [sector == k for k in range(6)]
    in_sector[0] |= sector == 6  # h rounds up to 1.0 for tiny negative shifts; torchvision
    # takes the sector modulo 6
    in_sector = [_bits(mask, np.uint8) for mask in in_sector]
    out = np.zeros(pixels.shape, np.uint8)
    for chosen, plan in zip(out, _CHANNEL_PLANS):
        for source, sectors in plan:
            mask = in_sector[sectors[0]]
            for k in sectors[1:]:
                mask = mask | in_sector[k]
            chosen |= values[source] & mask
    return torch.from_numpy(out)
