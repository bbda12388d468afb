"""Datasets stored as files: CIFAR-10/100 (python pickles), Tiny ImageNet and ImageFolder (images)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.utils.data import Dataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# CIFAR


class CIFARDataset(Dataset):
    """CIFAR-10/100 from the python-version pickles (the layout torchvision downloads)."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, classes: list[str], transform=None):
        self.data = data  # uint8 (N, 32, 32, 3)
        self.targets = targets.long()
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.data[i].numpy())
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.targets[i])


def unpickle(path: Path) -> dict:
    """A CIFAR python-version pickle, or ValueError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError) as e:
        raise ValueError(f"cannot read {path}: not a CIFAR python-version pickle ({type(e).__name__}: {e}); "
                         "the file is damaged or is another file: download the dataset again") from None
    if not isinstance(entry, dict):
        raise ValueError(f"cannot read {path}: a CIFAR pickle holds a dict, this one a {type(entry).__name__}")
    return entry


def cifar(key: str, root: Path, train: bool, download: bool, transform) -> CIFARDataset:
    if key == "cifar10":
        folder, files = "cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"])
        meta, names_key, label_key, url = "batches.meta", "label_names", "labels", CIFAR10_URL
    else:
        folder, files = "cifar-100-python", (["train"] if train else ["test"])
        meta, names_key, label_key, url = "meta", "fine_label_names", "fine_labels", CIFAR100_URL
    base = root / folder
    needed = files + [meta]
    missing = [f for f in needed if not (base / f).is_file()]
    if missing and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if key == "cifar10" else datasets.CIFAR100
        cls(str(root), train=train, download=True)
        missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        listing = ", ".join(needed)
        raise FileNotFoundError(
            f"{key} not found: missing {', '.join(missing)} in {base.resolve()}. Put the python-version "
            f"CIFAR files there ({listing}): download {url} and extract it into {root.resolve()}, "
            f"or pass download=True (CLI: --download)."
        )
    data, targets = [], []
    for f in files:
        entry = unpickle(base / f)
        arr = torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        data.append(arr.permute(0, 2, 3, 1).contiguous())
        targets.extend(entry[label_key])
    classes = list(unpickle(base / meta)[names_key])
    return CIFARDataset(torch.cat(data), torch.as_tensor(targets), classes, transform)


# --------------------------------------------------------------------------------------------
# image files (tiny-imagenet, imagefolder)


class ImageListDataset(Dataset):
    """(path, label) pairs read with PIL and converted to RGB."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform=None):
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        x = self.transform(img) if self.transform is not None else img
        return x, target


def _tiny_imagenet_root(root: Path) -> Path:
    for cand in (root / "tiny-imagenet-200", root):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    return root / "tiny-imagenet-200"


def tiny_imagenet(root: Path, train: bool, download: bool, transform) -> ImageListDataset:
    base = _tiny_imagenet_root(root)
    if not (base / "train").is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(root))
        base = _tiny_imagenet_root(root)
    layout = ("train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt "
              "(tab-separated: file, wnid, ...)")
    hint = (f"Put Tiny ImageNet at {base.resolve()} ({layout}): download {TINY_IMAGENET_URL} and unzip it "
            f"into {root.resolve()}, or pass download=True (CLI: --download).")
    if not (base / "train").is_dir():
        raise FileNotFoundError(f"tiny-imagenet not found: no {(base / 'train').resolve()}. {hint}")
    if (base / "wnids.txt").is_file():
        wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    else:
        wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    wnids = sorted(wnids)
    if not wnids:
        raise FileNotFoundError(f"tiny-imagenet: no class folders in {(base / 'train').resolve()}. {hint}")
    index = {w: i for i, w in enumerate(wnids)}
    samples: list[tuple[str, int]] = []
    if train:
        for w in wnids:
            folder = base / "train" / w / "images"
            if not folder.is_dir():
                folder = base / "train" / w
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in IMG_EXTENSIONS:
                    samples.append((str(p), index[w]))
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise FileNotFoundError(f"tiny-imagenet: missing {ann.resolve()}. {hint}")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            fname, w = parts[0].strip(), parts[1].strip()
            if w not in index:
                raise ValueError(f"tiny-imagenet: {ann} names class {w!r}, which has no training folder")
            samples.append((str(base / "val" / "images" / fname), index[w]))
    if not samples:
        raise FileNotFoundError(f"tiny-imagenet: no images found for the {'train' if train else 'val'} split. {hint}")
    return ImageListDataset(samples, wnids, transform)


def imagefolder(root: Path, train: bool, transform) -> ImageListDataset:
    from torchvision.datasets import ImageFolder

    split = "train" if train else ("val" if (root / "val").is_dir() else "test")
    folder = root / split
    if not folder.is_dir():
        want = "train" if train else "val"
        raise FileNotFoundError(
            f"imagefolder: no {(root / want).resolve()}. Put images at {root.resolve()}/train/<class>/<image> "
            f"and {root.resolve()}/val/<class>/<image> (one folder per class, the same class names in both)."
        )
    ds = ImageFolder(str(folder))
    if train is False and (root / "train").is_dir():
        train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if train_classes != ds.classes:
            raise ValueError(
                f"imagefolder: class folders differ between {root / 'train'} ({len(train_classes)}) and "
                f"{folder} ({len(ds.classes)}); they must hold the same class names"
            )
    return ImageListDataset(list(ds.samples), list(ds.classes), transform)
