import numpy as np
import pytest
import torch

from app.ml.serving.tiler import TileGrid, extract_tiles, stitch_tiles
from app.ml.transforms import normalize, resize_image, resize_labels
from app.ml.unet import UNet, UNetConfig


def random_image(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def run(model, tiles):
    with torch.no_grad():
        return model(torch.from_numpy(tiles[:, None])).numpy()


def randomized_model(config):
    torch.manual_seed(0)
    model = UNet(config).eval()
    for module in model.modules():  # non-trivial batch-norm statistics, so eval mode really transforms
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_normalize_makes_8_and_16_bit_versions_of_an_image_identical():
    image8 = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(np.uint8)
    a = normalize(image8 / 255.0)
    b = normalize(image8.astype(np.uint16) * 257 / 65535.0)
    assert np.allclose(a, b, atol=1e-5)
    assert abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-4


def test_resize_to_572_and_back_gives_the_exact_original_size():
    image = random_image((520, 704))
    there = resize_image(image, (572, 572))
    back = resize_image(there, image.shape)
    assert there.shape == (572, 572) and back.shape == (520, 704)
    assert np.abs(back - image).mean() < 0.3  # a smooth round trip, not noise


def test_resize_keeps_a_smooth_image_nearly_unchanged():
    yy, xx = np.mgrid[0:520, 0:704]
    image = (0.5 + 0.4 * np.sin(yy / 40.0) * np.cos(xx / 50.0)).astype(np.float32)
    back = resize_image(resize_image(image, (572, 572)), image.shape)
    assert np.abs(back - image).max() < 0.02


def test_resize_labels_never_blends_labels():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4).repeat(10, 0).repeat(10, 1)
    resized = resize_labels(labels, (57, 23))
    assert resized.shape == (57, 23)
    assert set(np.unique(resized)) <= set(range(12))
    assert np.array_equal(resize_labels(resized, (30, 40)).shape, (30, 40))


def test_tiles_are_mirrored_beyond_the_border():
    image = random_image((20, 30))
    tiles = extract_tiles(image, TileGrid(shape=(20, 30), tile_out=(16, 16), margin=4))
    assert tiles.shape == (4, 24, 24)
    assert np.array_equal(tiles[0, 4:20, 4:20], image[:16, :16])
    assert np.array_equal(tiles[0, 3, 4:20], image[1, :16])  # mirrored without repeating the edge row


def test_stitching_identity_tiles_gives_the_image_back():
    image = random_image((37, 53))
    grid = TileGrid(shape=image.shape, tile_out=(16, 16), margin=5)
    tiles = extract_tiles(image, grid)
    assert np.array_equal(stitch_tiles(tiles[:, None], grid)[0], image)


@pytest.mark.parametrize("shape", [(100, 130), (50, 200)])
def test_tiled_inference_equals_whole_image_inference_for_the_padded_unet(shape):
    config = UNetConfig(base_width=4, depth=2, num_classes=3)
    model = randomized_model(config)
    image = normalize(random_image(shape, seed=1))
    margin = config.receptive_radius()
    stride = config.stride
    whole = TileGrid(shape=shape, tile_out=tuple(-(-s // stride) * stride for s in shape), margin=margin)
    tiled = TileGrid(shape=shape, tile_out=(32, 32), margin=margin)
    assert whole.num_tiles == 1 and tiled.num_tiles > 6
    expected = stitch_tiles(run(model, extract_tiles(image, whole)), whole)
    actual = stitch_tiles(run(model, extract_tiles(image, tiled)), tiled)
    assert actual.shape == (3, *shape)
    assert np.allclose(actual, expected, atol=1e-5)


def test_too_little_margin_makes_tiles_disagree():
    """The same comparison with a small margin fails: the test above really depends on the overlap."""
    shape = (100, 130)
    config = UNetConfig(base_width=4, depth=2, num_classes=3)
    model = randomized_model(config)
    image = normalize(random_image(shape, seed=1))
    whole = TileGrid(shape=shape, tile_out=(100, 132), margin=24)
    tiled = TileGrid(shape=shape, tile_out=(32, 32), margin=4)
    expected = stitch_tiles(run(model, extract_tiles(image, whole)), whole)
    actual = stitch_tiles(run(model, extract_tiles(image, tiled)), tiled)
    assert not np.allclose(actual, expected, atol=1e-5)


def test_paper_unet_overlap_tile_covers_an_image_of_any_size():
    config = UNetConfig(base_width=2, depth=2, num_classes=2, padded=False, batch_norm=False)
    model = randomized_model(config)
    out = config.output_size(92)
    grid = TileGrid(shape=(70, 45), tile_out=(out, out), margin=(92 - out) // 2)
    outputs = run(model, extract_tiles(normalize(random_image((70, 45))), grid))
    assert outputs.shape[-1] == out
    assert stitch_tiles(outputs, grid).shape == (2, 70, 45)
