"""Fashion-MNIST: the real idx files (Debian's dataset-fashion-mnist) and synthetic ones."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from s2h.data import fashion_mnist, get_dataset, get_loaders

REAL = fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz"


def write_idx(path, array, magic=None, gz=True, cut=0):
    """An idx file written by hand from the format's definition (big-endian header, then bytes)."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    raw = raw[:len(raw) - cut] if cut else raw
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def make_split(folder, n=12, seed=0, train=True, gz=True, labels_n=None):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(labels_n or n,), dtype=np.uint8)
    img_name, lab_name = fashion_mnist.FILES[train]
    suffix = ".gz" if gz else ""
    write_idx(folder / (img_name + suffix), images, gz=gz)
    write_idx(folder / (lab_name + suffix), labels, gz=gz)
    return images, labels


@pytest.mark.skipif(not REAL.is_file() and os.environ.get("CI") != "true",
                    reason="dataset-fashion-mnist not installed (make data)")
def test_real_files():
    train = get_dataset("fashion-mnist", train=True)
    test = get_dataset("fashion-mnist", train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert sorted(set(train.targets.tolist())) == list(range(10))
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    # Undo the normalisation: the raw pixel mean of the training split is 0.2860 (published figure).
    raw = train.images * 0.3530 + 0.2860
    assert abs(raw.mean().item() - 0.2860) < 1e-3
    assert raw.min().item() > -1e-5 and raw.max().item() < 1 + 1e-5


@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_values(tmp_path, gz):
    images, labels = make_split(tmp_path, gz=gz)
    ds = get_dataset("fashion-mnist", tmp_path, train=True)
    want = (torch.from_numpy(images.astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(ds.images[:, 0], want)
    assert ds.targets.tolist() == labels.tolist()
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10


def test_torchvision_layout_and_env(tmp_path, monkeypatch):
    folder = tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    _, labels = make_split(folder, n=5, train=False)
    monkeypatch.setenv("S2H_DATA", str(tmp_path))
    ds = get_dataset("Fashion_MNIST", train=False)
    assert ds.targets.tolist() == labels.tolist()


def test_missing_files_say_how(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist", tmp_path / "empty")


def test_bad_magic(tmp_path):
    make_split(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)), magic=0x0801)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz has magic number 0x00000801"):
        get_dataset("fashion-mnist", tmp_path)


def test_truncated(tmp_path):
    make_split(tmp_path, n=4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)), cut=100)
    with pytest.raises(ValueError, match="truncated"):
        get_dataset("fashion-mnist", tmp_path)


def test_damaged_gzip(tmp_path):
    make_split(tmp_path, n=4)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*damaged"):
        get_dataset("fashion-mnist", tmp_path)


def test_label_count_mismatch(tmp_path):
    make_split(tmp_path, n=6, labels_n=5)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        get_dataset("fashion-mnist", tmp_path)


def test_augmentation_is_a_padded_window(tmp_path):
    make_split(tmp_path, n=3)
    ds = get_dataset("fashion-mnist", tmp_path, train=True, augment=True)
    plain = get_dataset("fashion-mnist", tmp_path, train=True, augment=False)
    assert ds.crop_padding == 3 and plain.crop_padding == 0
    torch.manual_seed(0)
    for i in range(3):
        x, _ = ds[i]
        src = plain.images[i, 0]
        padded = torch.full((34, 34), ds.pad_value)
        padded[3:31, 3:31] = src
        windows = [w for t in range(7) for left in range(7) for w in (padded[t:t + 28, left:left + 28],
                                                                      padded[t:t + 28, left:left + 28].flip(-1))]
        assert any(torch.equal(x[0], w) for w in windows)
    # the background pad equals a zero pixel after normalisation
    assert abs(ds.pad_value - (0 - 0.2860) / 0.3530) < 1e-6


def test_loaders_subset(tmp_path):
    make_split(tmp_path, n=40)
    make_split(tmp_path, n=10, train=False, seed=1)
    d = get_loaders("fashion-mnist", tmp_path, batch_size=8, max_train_samples=16)
    assert d.info.in_channels == 1 and d.info.image_size == 28 and d.num_classes == 10
    assert sum(x.shape[0] for x, _ in d.train) == 16
    assert sum(x.shape[0] for x, _ in d.test) == 10
