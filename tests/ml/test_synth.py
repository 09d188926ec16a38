import numpy as np
from scipy import ndimage

from app.ml.data.kaggle import KaggleDataset
from app.ml.data.synth import generate_image, main


def test_the_same_seed_writes_the_same_dataset(tmp_path):
    main(["--out", str(tmp_path / "a"), "--images", "2", "--height", "64", "--width", "96", "--seed", "3"])
    main(["--out", str(tmp_path / "b"), "--images", "2", "--height", "64", "--width", "96", "--seed", "3"])
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    a, b = KaggleDataset(tmp_path / "a").load(1), KaggleDataset(tmp_path / "b").load(1)
    assert np.array_equal(a.image, b.image) and a.image.shape == (64, 96)


def test_many_synthetic_cells_touch_a_neighbour():
    synth = generate_image(np.random.default_rng(0), 192, 192, "cort")
    labels = synth.labels
    touching = set()
    for shift in ((0, 1), (1, 0)):
        a, b = labels, np.roll(labels, shift, axis=(0, 1))
        pairs = (a > 0) & (b > 0) & (a != b)
        touching |= set(a[pairs].tolist())
    assert labels.max() > 30
    assert len(touching) > 0.3 * labels.max()


def test_cells_are_darker_than_their_halo_and_each_is_one_piece():
    synth = generate_image(np.random.default_rng(1), 192, 192, "shsy5y")
    cells = synth.labels > 0
    halo = ndimage.binary_dilation(cells, iterations=2) & ~cells
    assert synth.image[cells].mean() < synth.image[halo].mean()
    for label in range(1, synth.labels.max() + 1):
        assert ndimage.label(synth.labels == label)[1] == 1
