"""The instance step (app.ml.postprocess.maps_to_instances) in torch, so it runs where the maps already are.

On the GPU the reference's scipy/scikit-image step costs a device-to-host copy of both maps and a single-threaded
watershed; here everything heavy stays on the tensor's device and only the (H, W) int32 labels and the small
per-cell arrays come back. It is an approximation of the reference, not a copy of it: the watershed floods in
quantized levels (see _grow), so a few border pixels between touching cells can go the other way. Cells are
numbered 1..N, though not always in the reference's order.

Connected components are 4-connected (scipy's default structure), found by iterated minimum propagation with
pointer jumping (see _components). Runs on any device; CPU tensors are what the tests use. On a CPU it is far
slower than the reference (hundreds of whole-image passes; docs/performance.md), so the reference stays the CPU path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from app.ml.postprocess import InstanceConfig, Instances

# Flooding levels of the watershed: more levels follow skimage's priority order more closely but cost at least
# CHECK_EVERY propagation steps each; how much of the foreground gets skimage's label with 64 and with 32 is in
# docs/performance.md.
FLOOD_LEVELS = 64
# Propagation steps between two convergence checks: each check is a host sync, which stalls the GPU's queue of
# kernels; the price of checking seldom is up to CHECK_EVERY - 1 wasted steps per level (not yet tuned on a GPU).
CHECK_EVERY = 2


def maps_to_instances_torch(maps: torch.Tensor, config: InstanceConfig) -> Instances:
    """(2, H, W) float32 foreground probability and seed map on any device -> Instances, as maps_to_instances.

    Seeds are 4-connected regions of the seed map over its threshold (inside the foreground) of at least
    min_seed_area pixels; they grow over the foreground along the landscape foreground - 2 * seed; foreground
    blobs no seed reached become cells; cells under min_cell_area pixels are dropped.
    """
    foreground_prob, seed_prob = maps[0], maps[1]
    foreground = foreground_prob > config.foreground_threshold
    seeds = _seeds(seed_prob > config.seed_threshold, foreground, config.min_seed_area)
    labels = _grow(foreground_prob - 2.0 * seed_prob, seeds, foreground)
    labels = _add_unseeded_blobs(labels, foreground)
    return _keep_large(labels, foreground_prob, config.min_cell_area)


def _seeds(candidates: torch.Tensor, foreground: torch.Tensor, min_area: int) -> torch.Tensor:
    """(H, W) bool seed candidates and foreground -> (H, W) int32 seeds numbered 1..K, those under min_area gone."""
    markers, count = _components(candidates & foreground)
    keep = torch.bincount(markers.flatten(), minlength=count + 1) >= min_area
    keep[0] = False
    return _renumbering(keep)[markers]


def _add_unseeded_blobs(labels: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """(H, W) int32 labels -> the same, with each foreground blob that has no label yet as a new label."""
    blobs, _ = _components(foreground & (labels == 0))
    return torch.where(blobs > 0, blobs + labels.max(), labels)


def _keep_large(labels: torch.Tensor, foreground_prob: torch.Tensor, min_area: int) -> Instances:
    """Drop cells under min_area pixels, renumber the rest 1..N, and measure each one's area and mean score.

    labels: (H, W) int32; foreground_prob: (H, W) float32. Only the labels and the (N,) arrays cross to the host.
    """
    ids = labels.flatten()
    count = int(ids.max()) if ids.numel() else 0
    areas = torch.bincount(ids, minlength=count + 1)
    # float64 sums, as the reference's np.bincount: float32 loses digits over cells of thousands of pixels.
    sums = torch.bincount(ids, weights=foreground_prob.flatten().double(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    return Instances(
        labels=_renumbering(keep)[labels].to(torch.int32).cpu().numpy(),
        scores=(sums[keep] / areas[keep]).float().cpu().numpy(),
        areas=areas[keep].cpu().numpy().astype(np.int64, copy=False),
    )


def _renumbering(keep: torch.Tensor) -> torch.Tensor:
    """(L,) bool, keep[0] False -> (L,) int32 lookup table: old label -> 1..K for the K kept (in order), else 0."""
    return torch.where(keep, torch.cumsum(keep, 0, dtype=torch.int32), 0)


# ---------------------------------------------------------------------- connected components


def _components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(H, W) bool -> (H, W) int32 4-connected components numbered 1..K in raster order of their first pixel
    (as scipy.ndimage.label numbers them), and K.

    Every pixel starts with its own raster index and repeatedly takes the minimum over itself and its four
    neighbours in the mask, so each component ends with the index of its first pixel. Pointer jumping (a pixel
    takes the label of the pixel its label names, which is in the same component and never larger) carries a
    small label across many pixels at once, so long thin cells need far fewer steps than their length.
    """
    inside = _pad(mask, False)
    index = torch.arange(inside.numel(), device=mask.device, dtype=torch.int32).view(inside.shape)
    # The indices are those of the padded grid, so the last one is a border pixel: it stands for "outside",
    # larger than every index inside, and since it names itself, pointer jumping needs no special case.
    outside = inside.numel() - 1
    labels = torch.where(inside, index, outside)
    while True:
        before = labels
        for _ in range(CHECK_EVERY):
            labels = _jump(_min_step(labels, inside, outside))
        # Labels only ever decrease, so a block that changed nothing is a fixed point: one label per component.
        if torch.equal(labels, before):
            break
    roots = inside & (labels == index)
    numbering = torch.cumsum(roots.flatten(), 0, dtype=torch.int32)
    numbered = torch.where(inside, numbering[labels], 0)
    return numbered[1:-1, 1:-1], int(numbering[-1])


def _min_step(labels: torch.Tensor, inside: torch.Tensor, outside: int) -> torch.Tensor:
    """(H+2, W+2) int32 labels, `outside` on the border and off the mask -> each pixel of the mask the minimum over
    itself and its four neighbours."""
    up_down = torch.minimum(labels[:-2, 1:-1], labels[2:, 1:-1])
    left_right = torch.minimum(labels[1:-1, :-2], labels[1:-1, 2:])
    smallest = torch.minimum(labels[1:-1, 1:-1], torch.minimum(up_down, left_right))
    stepped = labels.clone()
    stepped[1:-1, 1:-1] = torch.where(inside[1:-1, 1:-1], smallest, outside)
    return stepped


def _jump(labels: torch.Tensor) -> torch.Tensor:
    """(H+2, W+2) int32 labels that are flat indices of the same grid -> each the label of the pixel it names."""
    flat = labels.flatten()
    return flat.index_select(0, flat).view(labels.shape)


def _pad(image: torch.Tensor, value: bool | int) -> torch.Tensor:
    """(H, W) -> (H+2, W+2) with a one-pixel border of `value`, so neighbours are slices, not copies."""
    return F.pad(image[None], (1, 1, 1, 1), value=value)[0]


# ---------------------------------------------------------------------- seeded growth


def _grow(landscape: torch.Tensor, seeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """skimage's watershed of `seeds` over `landscape` within `mask`, flooded in FLOOD_LEVELS quantized levels.

    landscape: (H, W) float32; seeds: (H, W) int32 (0 = none); mask: (H, W) bool -> (H, W) int32 labels, 0 where
    no seed reached. skimage labels a pixel when a labelled neighbour leaves its priority queue, lowest landscape
    first; here, at each level in turn, every labelled pixel at or below the level hands its label to its
    unlabelled neighbours in the mask, and the newly labelled do the same, until nothing changes. Within a level
    the flood spreads one pixel a step, like the queue's first-in-first-out order among equal values; where two
    labels reach a pixel in the same step, the larger label wins.
    """
    # -1 marks pixels off the mask (and the border): never 0, so never labelled; never a source.
    labels = _pad(torch.where(mask, seeds, -1), -1)
    levels = _flood_levels(landscape, mask)
    labelled = int((labels > 0).sum())
    for level in levels:
        below = _pad(mask & (landscape <= level), False).to(torch.int32)
        labels, labelled = _flood_level(labels, below, labelled)
    return labels[1:-1, 1:-1].clamp(min=0)


def _flood_levels(landscape: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L,) float32 flooding levels, L <= FLOOD_LEVELS: quantiles of the landscape within the mask, so each level
    floods about as many pixels; the last is its maximum, so the flood reaches all the seeds can. Empty for an empty
    mask."""
    ordered = torch.sort(landscape[mask]).values
    if ordered.numel() == 0:
        return ordered
    ranks = torch.arange(1, FLOOD_LEVELS + 1, device=landscape.device) * ordered.numel() // FLOOD_LEVELS - 1
    return torch.unique(ordered[ranks])


def _flood_level(labels: torch.Tensor, below: torch.Tensor, labelled: int) -> tuple[torch.Tensor, int]:
    """Spread labels from labelled pixels in `below` to unlabelled neighbours until nothing changes.

    labels: (H+2, W+2) int32, 0 = not yet, -1 = off the mask; below: (H+2, W+2) int32 0/1; labelled: how many pixels
    have a label -> the new labels and that count. A label once given never changes, so an unchanged count over a
    block of steps means stable.
    """
    while True:
        for _ in range(CHECK_EVERY):
            labels = _max_step(labels, below)
        now = int((labels > 0).sum())
        if now == labelled:
            return labels, now
        labelled = now


def _max_step(labels: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """One step of the flood, in place: each unlabelled pixel takes the largest label among its four neighbours
    in `below`.

    labels: (H+2, W+2) int32, 0 = not yet, -1 = off the mask (and the border, so slices need no bounds checks);
    below: (H+2, W+2) int32, 1 where a labelled pixel may hand its label on, else 0 (a product is cheaper than a
    select).
    """
    sources = labels * below
    up_down = torch.maximum(sources[:-2, 1:-1], sources[2:, 1:-1])
    left_right = torch.maximum(sources[1:-1, :-2], sources[1:-1, 2:])
    centre = labels[1:-1, 1:-1]
    centre.copy_(torch.where(centre == 0, torch.maximum(up_down, left_right), centre))
    return labels
