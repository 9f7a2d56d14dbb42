"""Any-resolution images as LLaVA-NeXT tiles them: a base view plus a grid of crops.

The image is fitted into the best of the configured ``grid_pinpoints`` (maximise the effective
resolution, then minimise the wasted area), resized keeping its aspect ratio, padded with black to that
size and cut into encoder-sized crops. Each crop and a squashed view of the whole image are encoded on
their own; the crops' patch features are laid out as one feature map, the rows and columns that only
hold padding are cut away (``unpad``), and each row of the map ends with a newline separator.

Conventions follow transformers' LLaVA-NeXT (``LlavaNextImageProcessor``, ``pack_image_features``):
pinpoints and sizes are ``(height, width)``. The geometry is plain integer arithmetic here (no torch,
no transformers), so the token count of an input is known before anything is encoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from mmkit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: LLaVA-NeXT's pinpoints for a 336 px CLIP, in crops: 1x2, 2x1, 2x2, 1x3, 3x1 (scaled to the encoder).
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(size: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` ([[336, 672], [672, 336], [672, 672], [1008, 336],
    [336, 1008]] for its 336 px CLIP) scaled to an encoder of ``size`` pixels."""
    return tuple((rows * size, cols * size) for rows, cols in LLAVA_NEXT_GRIDS)


def check_pinpoints(value: Any, size: int) -> tuple[tuple[int, int], ...]:
    """``grid_pinpoints`` as given in the options -> ``((height, width), ...)``, each a multiple of the
    encoder's ``size`` (the crops must tile it exactly)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"image encoder: grid_pinpoints={value!r}; give a non-empty list of [height, width] "
                          f"pairs in pixels, multiples of the image size {size} (e.g. [[{size}, {2 * size}], "
                          f"[{2 * size}, {size}], [{2 * size}, {2 * size}]])")
    out = []
    for pair in value:
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % size == 0 for v in pair))
        if not ok:
            raise ConfigError(f"image encoder: grid_pinpoints entry {pair!r} is not a [height, width] pair of "
                              f"positive multiples of the image size {size}")
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)


def select_best_resolution(original: tuple[int, int], possible: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas for an image of ``original`` = (height, width): the pinpoint that
    keeps the most of the image's pixels, ties to the one that wastes the least area (first wins).
    Float arithmetic exactly as LLaVA-NeXT and transformers compute it, so the choice matches theirs."""
    original_height, original_width = original
    best_fit = possible[0]
    max_effective, min_wasted = 0, math.inf
    for height, width in possible:
        scale = min(width / original_width, height / original_height)
        downscaled = int(original_width * scale) * int(original_height * scale)
        effective = min(downscaled, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def grid_shape(original: tuple[int, int], pinpoints: Sequence[tuple[int, int]], size: int) -> tuple[int, int]:
    """``(rows, cols)`` of ``size``-pixel crops for an image of ``original`` = (height, width)."""
    height, width = select_best_resolution(original, pinpoints)
    return height // size, width // size


def fitted_size(original: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into ``target`` keeping its aspect ratio (LLaVA-NeXT's
    ``resize_and_pad_image`` / transformers' ``get_patch_output_size``, float rounding included)."""
    original_height, original_width = original
    target_height, target_width = target
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def unpadded_shape(current: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
    """The part of a ``current`` = (height, width) feature map that covers the image rather than its
    padding (LLaVA-NeXT's ``unpad_image``): the same band is cut from both sides. Integer arithmetic:
    transformers rounds its float version to 7 places to get exactly this."""
    current_height, current_width = current
    original_height, original_width = original
    if original_width * current_height > current_width * original_height:  # wider than the map
        new_height = original_height * current_width // original_width
        return current_height - 2 * ((current_height - new_height) // 2), current_width
    new_width = original_width * current_height // original_height
    return current_height, current_width - 2 * ((current_width - new_width) // 2)


def unpad_bounds(current: tuple[int, int], original: tuple[int, int]) -> tuple[slice, slice]:
    """Row and column slices of :func:`unpadded_shape` (the band cut is centred)."""
    height, width = unpadded_shape(current, original)
    top, left = (current[0] - height) // 2, (current[1] - width) // 2
    return slice(top, top + height), slice(left, left + width)


@attrs.frozen
class AnyresLayout:
    """How crop features become tokens: ``side`` patch features per crop side (after pooling),
    ``unpad`` to drop padding rows/columns. Pure arithmetic: shared by counting and encoding."""

    side: int
    unpad: bool = True

    def map_shape(self, grid: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the grid's feature map after unpadding."""
        current = (grid[0] * self.side, grid[1] * self.side)
        return unpadded_shape(current, original) if self.unpad else current

    def num_tokens(self, grid: tuple[int, int], original: tuple[int, int]) -> int:
        """Base view + the grid map with one newline per map row."""
        height, width = self.map_shape(grid, original)
        return self.side * self.side + height * (width + 1)


@attrs.frozen(eq=False)
class AnyresImage:
    """One preprocessed image: ``pixels[1 + rows*cols, 3, S, S]`` (the base view, then the crops
    row by row), its ``grid`` (rows, cols) and its ``original`` (height, width) for unpadding.
    Tensors and ints only, so it pickles to and from data-loader workers."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    original: tuple[int, int]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AnyresImage:
        """``mmkit.modeling.features.move`` hook: ``fn`` over the tensors."""
        return AnyresImage(fn(self.pixels), self.grid, self.original)

    def to_dict(self) -> dict[str, Any]:
        """The fields (as torch-geometric's ``Data.to_dict``: how the contract suite finds the tensors)."""
        return attrs.asdict(self, recurse=False)


@attrs.frozen(eq=False)
class AnyresBatch:
    """Collated :class:`AnyresImage` items: every item's crops stacked into ``pixels[sum crops, 3, S, S]``
    (item by item), with each item's ``grid`` and ``original`` size."""

    pixels: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    originals: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.grids)

    @property
    def crops(self) -> list[int]:
        """Crops per item (base view included)."""
        return [1 + rows * cols for rows, cols in self.grids]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AnyresBatch:
        """``mmkit.modeling.features.move`` hook: ``fn`` over the tensors."""
        return AnyresBatch(fn(self.pixels), self.grids, self.originals)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False)


def tile(image: Image.Image, *, grid_size: tuple[int, int], crop: int, base: int, resample: int
         ) -> list[Image.Image]:
    """LLaVA-NeXT's views of an RGB ``image``: the whole image squashed to ``base`` x ``base``, then
    the image fitted into ``grid_size`` = (height, width) pixels, padded with black (centred) and cut
    into ``crop`` x ``crop`` tiles, row by row."""
    from PIL import Image as PILImage

    original = (image.height, image.width)
    height, width = fitted_size(original, grid_size)
    resized = image.resize((width, height), resample=resample)
    canvas = PILImage.new("RGB", (grid_size[1], grid_size[0]), (0, 0, 0))
    canvas.paste(resized, ((grid_size[1] - width) // 2, (grid_size[0] - height) // 2))
    tiles = [canvas.crop((x, y, x + crop, y + crop))
             for y in range(0, grid_size[0], crop) for x in range(0, grid_size[1], crop)]
    return [image.resize((base, base), resample=resample), *tiles]


def pack(features: torch.Tensor, grid: tuple[int, int], original: tuple[int, int], layout: AnyresLayout
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's crop features ``[1 + rows*cols, dim, side, side]`` (base view first) -> its tokens
    ``[n, dim]`` and separator mask ``[n]``, as transformers' LLaVA-NeXT ``pack_image_features`` lays
    them out: the base view's patches row by row, then the grid map (unpadded) row by row, each map row
    followed by a newline row (zeros here; the projector puts its learned separator there)."""
    import torch

    rows, cols = grid
    dim, side = features.shape[1], features.shape[2]
    base = features[0].flatten(1).transpose(0, 1)
    fmap = features[1:].view(rows, cols, dim, side, side).permute(2, 0, 3, 1, 4).reshape(dim, rows * side, cols * side)
    if layout.unpad:
        row_band, col_band = unpad_bounds((rows * side, cols * side), original)
        fmap = fmap[:, row_band, col_band]
    height, width = fmap.shape[1:]
    fmap = torch.cat([fmap, fmap.new_zeros(dim, height, 1)], dim=2)
    tokens = torch.cat([base, fmap.flatten(1).transpose(0, 1)])
    separators = torch.zeros(height, width + 1, dtype=torch.bool, device=features.device)
    separators[:, -1] = True
    separators = torch.cat([torch.zeros(side * side, dtype=torch.bool, device=features.device), separators.flatten()])
    return tokens, separators
