"""Fashion-MNIST from its four idx files (gzipped or not).

The files are found in the first of: the folder the caller names, ``$S2H_DATA``, and the folder of
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``). In each folder
the files may sit directly, under ``fashion-mnist/`` or under ``FashionMNIST/raw/`` (torchvision's
layout, which ``--download`` fills).

The idx parser is our own: torchvision's ``read_sn3_pascalvincent_tensor`` reads only uncompressed
files and fails on a bad file with an assertion that names neither the file nor the problem.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
# idx magic numbers: 0x0000 then type code 0x08 (unsigned byte) then the number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
HOW_TO_GET = ("Install Debian's package (as root: apt-get install dataset-fashion-mnist, or `make data`), "
              "pass the folder holding the four *-idx*-ubyte[.gz] files (--data-dir DIR, or $S2H_DATA), "
              "or let torchvision fetch them with --download.")


def _subfolders(base: Path) -> list[Path]:
    return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def candidate_dirs(data_dir=None) -> list[Path]:
    """Folders searched, in order."""
    bases = []
    if data_dir is not None:
        bases.append(Path(os.path.expanduser(str(data_dir))))
    elif os.environ.get("S2H_DATA"):
        bases.append(Path(os.environ["S2H_DATA"]))
    bases.append(DEBIAN_DIR)
    return [d for b in bases for d in _subfolders(b)]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_files(data_dir=None, train: bool = True) -> tuple[Path, Path]:
    """(images, labels) paths of one split, or FileNotFoundError saying how to get them."""
    stems = FILES[train]
    for folder in candidate_dirs(data_dir):
        paths = [_find(folder, s) for s in stems]
        if all(paths):
            return paths[0], paths[1]
    searched = ", ".join(str(d) for d in candidate_dirs(data_dir))
    raise FileNotFoundError(f"fashion-mnist: {stems[0]}[.gz] and {stems[1]}[.gz] not found (searched {searched}). "
                            + HOW_TO_GET)


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes as an array, with errors that name the file and the fault."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz raises EOFError
        raise ValueError(f"fashion-mnist: cannot read {path}: {e}. The file is damaged; " + HOW_TO_GET) from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"fashion-mnist: {path} is truncated ({len(raw)} bytes, shorter than its header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"fashion-mnist: {path} has magic number {found:#010x}, expected {magic:#010x} "
                         f"(an idx file of {ndim}-D unsigned bytes); it is not the file its name says")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    want = int(np.prod(dims))
    if len(raw) - header != want:
        raise ValueError(f"fashion-mnist: {path} is truncated or padded: its header says {dims} "
                         f"({want} bytes of data) but it holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(data_dir=None, train: bool = True, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of one split."""
    try:
        images_path, labels_path = find_files(data_dir, train)
    except FileNotFoundError:
        if not download:
            raise
        from torchvision.datasets import FashionMNIST

        root = Path(os.path.expanduser(str(data_dir))) if data_dir is not None else Path(
            os.environ.get("S2H_DATA", "data"))
        FashionMNIST(str(root), train=train, download=True)
        images_path, labels_path = find_files(root, train)
    images = read_idx(images_path, IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"fashion-mnist: {images_path} holds {images.shape[0]} images but {labels_path} "
                         f"holds {labels.shape[0]} labels; the two files must come from the same split")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"fashion-mnist: {labels_path} has label {int(labels.max())}; labels must be 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
