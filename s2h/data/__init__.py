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
``fashion-mnist``  the four idx files (``train-images-idx3-ubyte.gz`` ...; 60,000 + 10,000 28x28
                   grayscale images, 10 classes), from DIR, ``$S2H_DATA`` or Debian's
                   ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import fashion_mnist
from .files import CIFAR10_URL, CIFAR100_URL, IMG_EXTENSIONS, TINY_IMAGENET_URL, cifar, imagefolder, tiny_imagenet

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")

# Per-channel mean/std used to normalise inputs.
_STATS = {
    "digits": ((0.3053,), (0.3760,)),  # pixel/16 over all 1,797 images
    "fashion-mnist": ((0.2860,), (0.3530,)),  # pixel/255 over the 60,000 training images
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
}
_NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagefolder": 224}
_CHANNELS = {"digits": 1, "fashion-mnist": 1, "cifar10": 3, "cifar100": 3, "tiny-imagenet": 3, "imagefolder": 3}



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


def canonical_name(name: str) -> str:
    """The dataset key for a user-given name (case and ``_`` / ``-`` forgiven), or ValueError."""
    key = name.lower().replace("_", "-")
    key = {"tinyimagenet": "tiny-imagenet", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
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
    key = canonical_name(name)
    classes = num_classes if num_classes is not None else \
        {"digits": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}.get(key)
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
    """Images already held as one float tensor (N, C, H, W) with integer labels.

    ``crop_padding > 0`` takes a random crop of the zero-padded image (zero after normalisation is
    the mean, as torchvision's padded RandomCrop on normalised data is not; here the pad is the
    image's background value ``pad_value``), and ``flip`` a random horizontal flip: the same
    augmentation as the file datasets', done on tensors, drawn from torch's global RNG.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str], *,
                 crop_padding: int = 0, flip: bool = False, pad_value: float = 0.0):
        if images.shape[0] != targets.shape[0]:
            raise ValueError("TensorImageDataset: images and targets differ in length")
        self.images = images
        self.targets = targets.long()
        self.classes = classes
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.pad_value = float(pad_value)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        p = self.crop_padding
        if p > 0:
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.pad_value)
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[..., top:top + h, left:left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.targets[i])


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


def _fashion_mnist(root, train: bool, download: bool, image_size: int, augment: bool) -> TensorImageDataset:
    images, targets = fashion_mnist.load_split(root, train, download)
    x = images.unsqueeze(1).float().div_(255.0)
    if image_size != 28:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = _STATS["fashion-mnist"]
    x = (x - mean[0]) / std[0]
    aug = train and augment
    return TensorImageDataset(x.contiguous(), targets, list(fashion_mnist.CLASSES),
                              crop_padding=image_size // 8 if aug else 0, flip=aug, pad_value=-mean[0] / std[0])


# --------------------------------------------------------------------------------------------
# public API


def get_dataset(name: str, data_dir=None, train: bool = True, download: bool = False,
                image_size: int | None = None, augment: bool = False, split_seed: int = 0) -> Dataset:
    """One split of a dataset, yielding ``(normalised float CHW tensor, int label)``.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder holding the dataset (ignored for digits); default ``$S2H_DATA`` or ``./data``
            (fashion-mnist: then Debian's ``/usr/share/datasets/fashion-mnist``).
        train: the training split if True, else the test split (tiny-imagenet: val; imagefolder: val/).
        download: fetch cifar10/cifar100/tiny-imagenet/fashion-mnist into ``data_dir`` when missing.
            Never implied.
        image_size: square side to resize to; default the native size (digits 8, fashion-mnist 28, CIFAR 32,
            tiny-imagenet 64, imagefolder 224). ``digits`` with 32 upscales for CIFAR models.
        augment: random crop + horizontal flip (imagefolder: random resized crop + flip); only used
            when ``train`` (digits are never augmented: flipped digits are other digits).
        split_seed: seed of the digits train/test split (fixed by default so the test set is stable).

    The returned dataset has ``.classes`` (list of class names) and ``.targets``.
    """
    key = canonical_name(name)
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"get_dataset: image_size must be positive, got {image_size}")
    if key == "digits":
        return _digits(train, image_size, split_seed)
    size = int(image_size or _NATIVE_SIZE[key])
    if key == "fashion-mnist":
        return _fashion_mnist(data_dir, train, download, size, augment)
    root = _resolve_dir(data_dir)
    transform = _image_transform(key, train, augment, size)
    if key in ("cifar10", "cifar100"):
        return cifar(key, root, train, download, transform)
    if key == "tiny-imagenet":
        return tiny_imagenet(root, train, download, transform)
    if download:
        raise ValueError("get_dataset: imagefolder cannot be downloaded; point data_dir at your folders")
    return imagefolder(root, train, transform)


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
    key = canonical_name(name)
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
                   help="folder holding the dataset (default $S2H_DATA or ./data; fashion-mnist then "
                        "/usr/share/datasets/fashion-mnist; unused for digits)")
    g.add_argument("--download", action="store_true", help="download cifar10/cifar100/tiny-imagenet/fashion-mnist if missing")
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


# The name train.py used before it was public.
_check_name = canonical_name
