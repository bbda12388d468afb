"""s2h.data on the real bundled digits and on small fake datasets written to tmp dirs."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from s2h import data
from s2h.data import get_dataset, get_loaders

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _norm(chw_uint8, mean, std):
    x = torch.as_tensor(chw_uint8, dtype=torch.float32) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ------------------------------------------------------------------ digits


def test_digits_split_is_fixed_stratified_partition():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr, te = data.digits_split()
    tr2, te2 = data.digits_split()
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert len(tr) + len(te) == 1797 and not set(tr.tolist()) & set(te.tolist())
    counts = np.bincount(d.target[te.numpy()], minlength=10)
    assert all(abs(c - 0.2 * n) <= 1 for c, n in zip(counts, np.bincount(d.target)))
    other = data.digits_split(split_seed=1)[1]
    assert not torch.equal(other, te)


def test_digits_values_and_upscaling():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr, te = data.digits_split()
    ds = get_dataset("digits", train=False)
    assert len(ds) == len(te) and ds.classes == [str(i) for i in range(10)]
    x, y = ds[5]
    want = (torch.tensor(d.images[te[5]], dtype=torch.float32) / 16 - 0.3053) / 0.3760
    assert x.shape == (1, 8, 8) and torch.allclose(x[0], want, atol=1e-6) and y == d.target[te[5]]
    assert len(get_dataset("digits", train=True)) == len(tr)
    big = get_dataset("digits", train=False, image_size=32)
    assert big[5][0].shape == (1, 32, 32) and big[5][1] == y
    # bilinear weights sum to 1, so upscaling commutes with the affine normalisation
    ref = F.interpolate(x[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(big[5][0], ref, atol=1e-5, rtol=1e-5)


def test_digits_loaders_deterministic_and_splits():
    a = get_loaders("digits", batch_size=32, seed=3)
    b = get_loaders("digits", batch_size=32, seed=3)
    c = get_loaders("digits", batch_size=32, seed=4)
    xa, ya = next(iter(a.train))
    xb, yb = next(iter(b.train))
    xc, yc = next(iter(c.train))
    assert xa.shape == (32, 1, 8, 8) and ya.dtype == torch.long
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert a.info.num_classes == 10 and a.info.in_channels == 1 and a.info.image_size == 8
    # second epoch reshuffles, reproducibly
    e2a, e2b = next(iter(a.train))[1], next(iter(b.train))[1]
    assert torch.equal(e2a, e2b) and not torch.equal(e2a, ya)
    # validation carved out of train, disjoint, seeded
    v = get_loaders("digits", batch_size=32, seed=3, val_fraction=0.25, max_train_samples=400)
    tr_idx, val_idx = set(v.train.dataset.indices), set(v.val.dataset.indices)
    assert len(val_idx) == 100 and len(tr_idx) == 300 and not tr_idx & val_idx
    v2 = get_loaders("digits", batch_size=32, seed=3, val_fraction=0.25, max_train_samples=400)
    assert set(v2.val.dataset.indices) == val_idx
    assert len(get_loaders("digits", max_test_samples=50).test.dataset) == 50


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        get_loaders("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        get_loaders("digits", batch_size=0)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        get_dataset("imagefolder", "/nonexistent", download=True)


# ------------------------------------------------------------------ CIFAR (fake pickles)


def _write_cifar10(root, rng):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    train = []
    for i in range(1, 6):
        arr = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=2)]
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": arr, "labels": labels}, f)
        train.append((arr, labels))
    arr = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": arr, "labels": [1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return train, arr


def test_cifar10_reads_pickles(tmp_path):
    rng = np.random.default_rng(0)
    train, test_arr = _write_cifar10(tmp_path, rng)
    ds = get_dataset("cifar10", tmp_path, train=True)
    assert len(ds) == 10 and ds.classes[3] == "c3"
    x, y = ds[4]  # batch 3, image 0
    assert x.shape == (3, 32, 32) and y == train[2][1][0]
    torch.testing.assert_close(x, _norm(train[2][0][0].reshape(3, 32, 32), CIFAR10_MEAN, CIFAR10_STD))
    te = get_dataset("cifar10", tmp_path, train=False)
    assert [te[i][1] for i in range(3)] == [1, 2, 3]
    torch.testing.assert_close(te[2][0], _norm(test_arr[2].reshape(3, 32, 32), CIFAR10_MEAN, CIFAR10_STD))
    aug = get_dataset("cifar10", tmp_path, train=True, augment=True)
    assert aug[0][0].shape == (3, 32, 32)
    up = get_dataset("cifar10", tmp_path, train=False, image_size=40)
    assert up[0][0].shape == (3, 40, 40)
    loaders = get_loaders("cifar10", tmp_path, batch_size=4, seed=0)
    xb, yb = next(iter(loaders.train))
    assert xb.shape == (4, 3, 32, 32) and loaders.info.num_classes == 10 and len(loaders.test.dataset) == 3


def test_cifar100_reads_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    with open(base / "train", "wb") as f:
        pickle.dump({"data": arr, "fine_labels": [99, 0, 5, 7], "coarse_labels": [1, 2, 3, 4]}, f)
    with open(base / "test", "wb") as f:
        pickle.dump({"data": arr[:2], "fine_labels": [3, 4], "coarse_labels": [0, 0]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["x"] * 20}, f)
    ds = get_dataset("cifar100", tmp_path)
    assert [ds[i][1] for i in range(4)] == [99, 0, 5, 7] and len(ds.classes) == 100
    torch.testing.assert_close(ds[0][0], _norm(arr[0].reshape(3, 32, 32), CIFAR100_MEAN, CIFAR100_STD))
    assert get_loaders("cifar100", tmp_path, batch_size=2).info.num_classes == 100


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_says_where(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset(name, tmp_path / "nowhere")
    msg = str(e.value)
    assert str((tmp_path / "nowhere" / folder).resolve()) in msg and "download" in msg and ".tar.gz" in msg


# ------------------------------------------------------------------ image folders


def _png(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder(tmp_path):
    colors = {"cat": (200, 10, 30), "dog": (5, 120, 250)}
    for split, n in (("train", 3), ("val", 2)):
        for cls, col in colors.items():
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", col)
    ds = get_dataset("imagefolder", tmp_path, train=True, image_size=16)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    want = _norm(np.array(colors["dog"], dtype=np.uint8).reshape(3, 1, 1), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(x, want.expand(3, 16, 16), atol=1e-5, rtol=0)
    val = get_dataset("imagefolder", tmp_path, train=False, image_size=16)
    assert len(val) == 4 and [val[i][1] for i in range(4)] == [0, 0, 1, 1]
    loaders = get_loaders("imagefolder", tmp_path, batch_size=2, image_size=16)
    assert loaders.info.num_classes == 2 and next(iter(loaders.train))[0].shape == (2, 3, 16, 16)
    # grayscale images come out as 3 channels
    Image.new("L", (8, 8), 77).save(tmp_path / "train" / "cat" / "gray.png")
    assert get_dataset("imagefolder", tmp_path, image_size=16)[0][0].shape == (3, 16, 16)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>/<image>"):
        get_dataset("imagefolder", tmp_path)
    _png(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    _png(tmp_path / "train" / "b" / "0.png", (1, 2, 3))
    _png(tmp_path / "val" / "a" / "0.png", (1, 2, 3))
    _png(tmp_path / "val" / "c" / "0.png", (1, 2, 3))
    with pytest.raises(ValueError, match="class folders differ"):
        get_dataset("imagefolder", tmp_path, train=False)


def _write_tiny_imagenet(root):
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # unsorted on purpose: labels follow sorted wnids
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w, col in (("n01", (10, 20, 30)), ("n02", (200, 100, 0))):
        for i in range(2):
            _png(base / "train" / w / "images" / f"{w}_{i}.JPEG", col, size=(64, 64))
    lines = []
    for i, w in enumerate(["n02", "n01", "n02"]):
        _png(base / "val" / "images" / f"val_{i}.JPEG", (0, 0, 0), size=(64, 64))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tiny_imagenet(tmp_path):
    base = _write_tiny_imagenet(tmp_path)
    ds = get_dataset("tiny-imagenet", tmp_path, train=True)
    assert ds.classes == ["n01", "n02"] and len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert ds[0][0].shape == (3, 64, 64)
    val = get_dataset("tiny-imagenet", tmp_path, train=False)
    assert [val[i][1] for i in range(3)] == [1, 0, 1]
    # the dataset folder itself is accepted too
    assert len(get_dataset("tiny-imagenet", base, train=False)) == 3
    small = get_loaders("tiny-imagenet", tmp_path, batch_size=2, image_size=32)
    assert next(iter(small.test))[0].shape == (3, 3, 32, 32) and small.info.num_classes == 2


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        get_dataset("tiny-imagenet", tmp_path)
    assert str((tmp_path / "tiny-imagenet-200").resolve()) in str(e.value)
    assert "val_annotations.txt" in str(e.value)


def test_corrupt_cifar_file_is_named(tmp_path, capsys):
    _write_cifar10(tmp_path, np.random.default_rng(0))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR python-version pickle"):
        get_dataset("cifar10", tmp_path, train=True)
    # The command line reports the same file and fails cleanly.
    from s2h import cli

    rc = cli.main(["prune", "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "resnet8",
                   "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc != 0 and "data_batch_3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a failed run leaves no empty output folder
