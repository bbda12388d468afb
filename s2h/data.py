"""Datasets and loaders shared by the s2h command-line tools.

Five datasets, one call each::

    from s2h.data import get_dataset, get_loaders
    ds = get_dataset("digits", image_size=32)             # bundled with scikit-learn, offline
    data = get_loaders("cifar10", "~/data", batch_size=128, seed=0)
    for x, y in data.train: ...

=================  ===========================================================================
``digits``         scikit-learn's bundled ``load_digits`` (1,797 8x8 grayscale images, 10
                   classes). No files needed. A fixed stratified 80/20 train/test split
                   (``split_seed``). ``image_size=32`` upscales (bilinear) for CIFAR-sized models.
``cifar10``        ``DIR/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta): the
                   "python version" archive, the layout torchvision uses.
``cifar100``       ``DIR/cifar-100-python/`` (train, test, meta), fine labels.
``tiny-imagenet``  ``DIR/tiny-imagenet-200/`` (or DIR itself): train/<wnid>/images/*.JPEG,
                   val/images/*.JPEG + val/val_annotations.txt, wnids.txt. The labelled val split
                   serves as the test split.
``imagefolder``    ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``test/`` accepted in place
                   of ``val/``), any images PIL reads; resized to ``image_size`` (default 224).
=================  ===========================================================================

Nothing is downloaded unless ``download=True`` (cifar10, cifar100, tiny-imagenet). A missing
dataset raises :class:`FileNotFoundError` that says exactly which files to put where.

Determinism: the digits split, the validation split carved out of the training set, the
``max_*_samples`` subsets and the training shuffle order all come from seeded generators, so the
same arguments give the same batches. (Random augmentation draws from torch's global RNG in the
main process when ``num_workers=0``; seed it with ``torch.manual_seed``. Workers are seeded from the
loader's generator.)

The CIFAR pickles are read directly rather than through ``torchvision.datasets.CIFAR10``: that
class insists on the archive's MD5 sums, so re-packed or subset copies would be refused.
"""
from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

DATASETS = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")

# Per-channel mean/std used to normalise inputs.
_STATS = {
    "digits": ((0.3053,), (0.3760,)),  # pixel/16 over all 1,797 images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
}
_NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagefolder": 224}
_CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "tiny-imagenet": 3, "imagefolder": 3}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class DataLoaders:
    """The loaders :func:`get_loaders` returns. ``val`` is None unless ``val_fraction > 0``."""

    train: DataLoader
    test: DataLoader
    val: DataLoader | None
    info: DatasetInfo
    classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


# --------------------------------------------------------------------------------------------
# helpers


def _check_name(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key == "tinyimagenet":
        key = "tiny-imagenet"
    if key not in DATASETS:
        raise ValueError(f"get_dataset: unknown dataset {name!r}; choose one of {DATASETS}")
    return key


def default_data_dir() -> Path:
    """``$S2H_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("S2H_DATA", "data"))


def _resolve_dir(data_dir) -> Path:
    return Path(os.path.expanduser(str(data_dir))) if data_dir is not None else default_data_dir()


def dataset_info(name: str, image_size: int | None = None, num_classes: int | None = None) -> DatasetInfo:
    """Static facts about a dataset. ``num_classes`` overrides the standard class count (it is read
    from the files by :func:`get_loaders`; imagefolder has no standard count)."""
    key = _check_name(name)
    classes = num_classes if num_classes is not None else \
        {"digits": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}.get(key)
    if classes is None:
        raise ValueError("dataset_info: imagefolder needs num_classes (it is read from the folders)")
    mean, std = _STATS[key]
    return DatasetInfo(key, int(classes), _CHANNELS[key], int(image_size or _NATIVE_SIZE[key]), mean, std)


def _image_transform(key: str, train: bool, augment: bool, image_size: int):
    """PIL image -> normalised float tensor; random crop + flip on the training split if asked."""
    from torchvision import transforms as T

    mean, std = _STATS[key]
    steps: list[Callable] = []
    if key == "imagefolder":
        if train and augment:
            steps += [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(max(image_size, round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    else:
        if image_size != _NATIVE_SIZE[key]:
            steps.append(T.Resize((image_size, image_size)))
        if train and augment:
            steps += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# digits


class TensorImageDataset(Dataset):
    """Images already held as one float tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]):
        if images.shape[0] != targets.shape[0]:
            raise ValueError("TensorImageDataset: images and targets differ in length")
        self.images = images
        self.targets = targets.long()
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


def digits_split(n_test_fraction: float = 0.2, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) of a stratified split of the 1,797 digits, fixed by ``split_seed``."""
    from sklearn.datasets import load_digits

    y = torch.as_tensor(load_digits().target)
    g = torch.Generator().manual_seed(split_seed)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = round(n_test_fraction * idx.numel())
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _digits(train: bool, image_size: int | None, split_seed: int) -> TensorImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    targets = torch.as_tensor(d.target, dtype=torch.long)
    tr, te = digits_split(split_seed=split_seed)
    idx = tr if train else te
    images, targets = images[idx], targets[idx]
    if image_size is not None and image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
    mean, std = _STATS["digits"]
    images = (images - mean[0]) / std[0]
    return TensorImageDataset(images.contiguous(), targets, [str(i) for i in range(10)])


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


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar(key: str, root: Path, train: bool, download: bool, transform) -> CIFARDataset:
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
        entry = _unpickle(base / f)
        arr = torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        data.append(arr.permute(0, 2, 3, 1).contiguous())
        targets.extend(entry[label_key])
    classes = list(_unpickle(base / meta)[names_key])
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


def _tiny_imagenet(root: Path, train: bool, download: bool, transform) -> ImageListDataset:
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


def _imagefolder(root: Path, train: bool, transform) -> ImageListDataset:
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


# --------------------------------------------------------------------------------------------
# public API


def get_dataset(name: str, data_dir=None, train: bool = True, download: bool = False,
                image_size: int | None = None, augment: bool = False, split_seed: int = 0) -> Dataset:
    """One split of a dataset, yielding ``(normalised float CHW tensor, int label)``.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder holding the dataset (ignored for digits); default ``$S2H_DATA`` or ``./data``.
        train: the training split if True, else the test split (tiny-imagenet: val; imagefolder: val/).
        download: fetch cifar10/cifar100/tiny-imagenet into ``data_dir`` when missing. Never implied.
        image_size: square side to resize to; default the native size (digits 8, CIFAR 32,
            tiny-imagenet 64, imagefolder 224). ``digits`` with 32 upscales for CIFAR models.
        augment: random crop + horizontal flip (imagefolder: random resized crop + flip); only used
            when ``train`` (digits are never augmented: flipped digits are other digits).
        split_seed: seed of the digits train/test split (fixed by default so the test set is stable).

    The returned dataset has ``.classes`` (list of class names) and ``.targets``.
    """
    key = _check_name(name)
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"get_dataset: image_size must be positive, got {image_size}")
    if key == "digits":
        return _digits(train, image_size, split_seed)
    root = _resolve_dir(data_dir)
    size = int(image_size or _NATIVE_SIZE[key])
    transform = _image_transform(key, train, augment, size)
    if key in ("cifar10", "cifar100"):
        return _cifar(key, root, train, download, transform)
    if key == "tiny-imagenet":
        return _tiny_imagenet(root, train, download, transform)
    if download:
        raise ValueError("get_dataset: imagefolder cannot be downloaded; point data_dir at your folders")
    return _imagefolder(root, train, transform)


def _seeded_subset(n: int, k: int | None, seed: int) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    if k < 1:
        raise ValueError(f"get_loaders: a sample limit must be positive, got {k}")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def _worker_init(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def get_loaders(name: str, data_dir=None, batch_size: int = 128, *, eval_batch_size: int | None = None,
                num_workers: int = 0, seed: int = 0, val_fraction: float = 0.0, download: bool = False,
                image_size: int | None = None, augment: bool = True, max_train_samples: int | None = None,
                max_test_samples: int | None = None, drop_last: bool = False,
                pin_memory: bool | None = None) -> DataLoaders:
    """Train / (val) / test loaders, deterministic for a given ``seed``.

    ``val_fraction`` holds out that fraction of the training split (seeded, without augmentation)
    as ``val``. ``max_train_samples`` / ``max_test_samples`` keep a seeded random subset (quick runs).
    The training loader reshuffles every epoch from a generator seeded with ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"get_loaders: batch_size must be positive, got {batch_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"get_loaders: val_fraction must be in [0, 1), got {val_fraction}")
    key = _check_name(name)
    train_ds = get_dataset(key, data_dir, train=True, download=download, image_size=image_size, augment=augment)
    test_ds = get_dataset(key, data_dir, train=False, download=False, image_size=image_size)
    classes = list(getattr(train_ds, "classes", []))
    info = dataset_info(key, image_size, num_classes=len(classes) or None)

    n = len(train_ds)
    keep = _seeded_subset(n, max_train_samples, seed)
    val = None
    if val_fraction > 0:
        g = torch.Generator().manual_seed(seed + 1)
        perm = keep[torch.randperm(keep.numel(), generator=g)]
        n_val = max(1, round(val_fraction * perm.numel()))
        val_idx, keep = torch.sort(perm[:n_val]).values, torch.sort(perm[n_val:]).values
        plain = train_ds if (key == "digits" or not augment) else get_dataset(
            key, data_dir, train=True, image_size=image_size, augment=False)
        val = Subset(plain, val_idx.tolist())
    train_sub = train_ds if keep.numel() == n else Subset(train_ds, keep.tolist())
    test_keep = _seeded_subset(len(test_ds), max_test_samples, seed + 2)
    test_sub = test_ds if test_keep.numel() == len(test_ds) else Subset(test_ds, test_keep.tolist())

    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    common = dict(num_workers=num_workers, pin_memory=pin, worker_init_fn=_worker_init if num_workers else None,
                  persistent_workers=num_workers > 0)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_sub, batch_size=batch_size, shuffle=True, generator=g, drop_last=drop_last,
                              **common)
    ebs = eval_batch_size or max(batch_size, 256)
    test_loader = DataLoader(test_sub, batch_size=ebs, shuffle=False, **common)
    val_loader = DataLoader(val, batch_size=ebs, shuffle=False, **common) if val is not None else None
    return DataLoaders(train_loader, test_loader, val_loader, info, classes)


# --------------------------------------------------------------------------------------------
# command-line options shared by the s2h subcommands


def add_data_arguments(parser: argparse.ArgumentParser, default: str = "digits") -> None:
    """The data options every training subcommand takes (see :func:`loaders_from_args`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=default, choices=DATASETS, help=f"dataset (default {default})")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset (default $S2H_DATA or ./data; unused for digits)")
    g.add_argument("--download", action="store_true", help="download cifar10/cifar100/tiny-imagenet if missing")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize inputs to this square size (digits: 8 native, 32 to upscale)")
    g.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    g.add_argument("--no-augment", action="store_true", help="no random crop/flip on the training split")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the training split as a validation set")
    g.add_argument("--max-train-samples", type=int, default=None, help="seeded subset of the training split")
    g.add_argument("--max-test-samples", type=int, default=None, help="seeded subset of the test split")


def loaders_from_args(args: argparse.Namespace) -> DataLoaders:
    return get_loaders(args.data, args.data_dir, batch_size=args.batch_size, num_workers=args.workers,
                       seed=getattr(args, "seed", 0), val_fraction=args.val_fraction, download=args.download,
                       image_size=args.image_size, augment=not args.no_augment,
                       max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples)
