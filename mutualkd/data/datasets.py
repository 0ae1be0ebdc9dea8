"""Datasets and the held-out split, from the typed `DataConfig`.

Datasets keep (or decode to) uint8 ``[C,H,W]`` images and hand out whole batches through
``__getitems__``, so a DataLoader with ``collate_fn=identity_collate`` costs one tensor index op
per batch (`mutualkd.data.loaders`); augmentation runs afterwards on batched tensors
(`mutualkd.data.augment`).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mutualkd.config import ComposedConfig, DataConfig, SyntheticConfig
from mutualkd.errors import UserError
from mutualkd.models.stats import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR_DEFAULT_ROOT = "~/.cache/mutualkd"  # where CIFAR lives (and is downloaded to) without data.root
DIGITS_TEST_FRACTION, DIGITS_TEST_SEED = 0.2, 0
# Two-digit composed classes: samples per class drawn for each part (about the digits' 144 / 36 per class).
COMPOSED_PER_CLASS = {"train": 144, "test": 36}


@dataclass(frozen=True)
class DataSpec:
    """What the model and the augmentation need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]  # per channel, pixel values in [0, 1]
    std: tuple[float, ...]
    crop_padding: int  # default train augmentation: random crop with this zero padding ...
    flip: bool  # ... and random horizontal flip


class ImageTensors(Dataset):
    """In-memory uint8 images ``[N,C,H,W]`` with int64 targets ``[N]``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if targets.dim() != 1 or len(targets) != len(images):
            raise ValueError(f"targets must be [N={len(images)}], got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.to(torch.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "target": self.targets[i], "index": torch.tensor(i, dtype=torch.int64)}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return {"image": self.images[idx], "target": self.targets[idx], "index": idx}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageTensors:
        """A new dataset holding these rows; its ``index`` values are its own positions 0..n-1."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageTensors(self.images[idx], self.targets[idx])


class ImageFolderTensors(Dataset):
    """Image files decoded on access: RGB, shorter side resized to ``image_size``, center crop."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> torch.Tensor:
        from PIL import Image

        path, s = self.samples[i][0], self.image_size
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = s / min(w, h)
                nw, nh = max(s, int(w * scale)), max(s, int(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - s) // 2, (nh - s) // 2
                im = im.crop((left, top, left + s, top + s))
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise UserError(f"data.root: cannot decode image {path}: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self._decode(i), "target": self.targets[i], "index": torch.tensor(i, dtype=torch.int64)}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = torch.stack([self._decode(i) for i in idx.tolist()])
        return {"image": images, "target": self.targets[idx], "index": idx}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageFolderTensors:
        """A new dataset holding these samples; its ``index`` values are its own positions 0..n-1."""
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        return ImageFolderTensors([self.samples[i] for i in idx], self.image_size)


ImageDataset = ImageTensors | ImageFolderTensors


@dataclass
class Splits:
    """Train / held-out validation (None when ``val_split == 0``) / test datasets and their spec."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    spec: DataSpec


# ----------------------------------------------------------------------------- splitting


def class_members(targets: torch.Tensor) -> list[torch.Tensor]:
    """Ascending positions of each present class's samples, classes in ascending label order."""
    order = torch.argsort(targets, stable=True)
    return [group for group in torch.split(order, torch.bincount(targets).tolist()) if len(group)]


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into (kept, held) with exactly ``round(n_c * fraction)`` held per class.

    A class with at least 2 samples gives at least one when ``fraction > 0``. Both index tensors
    are sorted, so the subsets keep the original order. Depends only on (targets, fraction, seed).
    """
    rng = np.random.default_rng(seed)
    held = [np.zeros(0, dtype=np.int64)]
    for members in class_members(targets):
        k = round(len(members) * fraction)
        if fraction > 0 and len(members) >= 2:
            k = max(k, 1)
        held.append(rng.permutation(members.numpy())[:k])
    held_idx = np.sort(np.concatenate(held))
    keep = np.ones(len(targets), dtype=bool)
    keep[held_idx] = False
    return torch.from_numpy(np.flatnonzero(keep)), torch.from_numpy(held_idx)


# ----------------------------------------------------------------------------- file formats

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (plain or ``.gz``): 2 zero bytes, dtype code, ndim, big-endian uint32 dims, data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"data.root: cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"data.root: {path} is not an idx file (bad magic number {raw[:4].hex() or 'none'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise UserError(f"data.root: {path} is truncated (header of {ndim} dims incomplete)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(f"data.root: {path} has {len(raw) - header} data bytes but dims {dims} need {expected} "
                        "(truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(root: str, name: str, hint: str) -> str:
    """``root/name`` or ``root/name.gz``, whichever exists (plain preferred)."""
    for candidate in (os.path.join(root, name), os.path.join(root, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"data.root: {root} has no {name}[.gz] ({hint})")


def _check_labels(targets: torch.Tensor, num_classes: int, path: str) -> None:
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise UserError(f"data.root: {path} has labels outside 0..{num_classes - 1}")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise UserError(f"data.root: cannot read CIFAR batch {path}: {e}") from None


def _read_cifar_batches(paths: list[str], label_key: bytes, num_classes: int) -> ImageTensors:
    """Concatenate official CIFAR python-pickle batches (``b'data'`` rows of 3072 uint8, CHW order)."""
    images, targets = [], []
    for path in paths:
        batch = _unpickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise UserError(f"data.root: {path} is not a CIFAR batch (needs keys b'data' and {label_key!r})")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = torch.as_tensor(np.asarray(batch[label_key]), dtype=torch.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise UserError(f"data.root: {path} holds data {data.shape} / {len(labels)} labels, expected [N,3072] / N")
        _check_labels(labels, num_classes, path)
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        targets.append(labels)
    return ImageTensors(torch.cat(images), torch.cat(targets))


# ----------------------------------------------------------------------------- dataset loaders


def _load_digits() -> tuple[ImageTensors, ImageTensors, DataSpec]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.data * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8))
    full = ImageTensors(images, torch.from_numpy(d.target.astype(np.int64)))
    train_idx, test_idx = stratified_split(full.targets, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    spec = DataSpec("digits", 10, 1, (8, 8), DIGITS_MEAN, DIGITS_STD, crop_padding=1, flip=False)
    return full.subset(train_idx), full.subset(test_idx), spec


def _load_fashion_mnist(root: str | None) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    root = os.path.expanduser(root or FASHION_MNIST_ROOT)
    hint = "install Debian's dataset-fashion-mnist or set data.root"

    def part(prefix: str) -> ImageTensors:
        image_path = _find_file(root, f"{prefix}-images-idx3-ubyte", hint)
        label_path = _find_file(root, f"{prefix}-labels-idx1-ubyte", hint)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"data.root: {image_path} {images.shape} and {label_path} {labels.shape} do not match")
        targets = torch.from_numpy(labels.astype(np.int64))
        _check_labels(targets, 10, label_path)
        return ImageTensors(torch.from_numpy(images).unsqueeze(1), targets)

    train, test = part("train"), part("t10k")
    size = tuple(train.images.shape[2:])
    spec = DataSpec("fashion_mnist", 10, 1, size, FASHION_MNIST_MEAN, FASHION_MNIST_STD, crop_padding=2, flip=True)
    return train, test, spec


def _load_cifar(name: str, root: str | None, download: bool) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    """Read the official python-pickle batches; torchvision only downloads and verifies them."""
    root = os.path.expanduser(root or CIFAR_DEFAULT_ROOT)
    if name == "cifar10":
        folder, train_files, test_files, label_key, k = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        folder, train_files, test_files, label_key, k = "cifar-100-python", ["train"], ["test"], b"fine_labels", 100
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root=root, train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise UserError(f"data.download: fetching {name} into {root} failed: {e}") from None
    base = os.path.join(root, folder)
    for f in train_files + test_files:
        if not os.path.isfile(os.path.join(base, f)):
            raise UserError(f"data.root: {base} has no {f} (set data.download=true to fetch {name}, "
                            f"or data.root to the folder holding {folder})")
    train = _read_cifar_batches([os.path.join(base, f) for f in train_files], label_key, k)
    test = _read_cifar_batches([os.path.join(base, f) for f in test_files], label_key, k)
    return train, test, DataSpec(name, k, 3, (32, 32), mean, std, crop_padding=4, flip=True)


def _load_imagefolder(root: str | None, image_size: int) -> tuple[ImageFolderTensors, ImageFolderTensors, DataSpec]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if root is None:
        raise UserError("data.root: imagefolder needs data.root (a folder with train/ and val/ or test/)")
    root = os.path.expanduser(root)
    train_dir = os.path.join(root, "train")
    test_dir = next((d for d in (os.path.join(root, s) for s in ("val", "test")) if os.path.isdir(d)), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise UserError(f"data.root: {root} needs train/ and val/ (or test/) subfolders of class folders")
    try:
        classes, class_to_idx = find_classes(train_dir)
        test_classes, _ = find_classes(test_dir)
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise UserError(f"data.root: {test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}")
        train_samples = make_dataset(train_dir, class_to_idx, IMG_EXTENSIONS)
        test_samples = make_dataset(test_dir, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:
        raise UserError(f"data.root: {e}".replace("\n", " ")) from None
    spec = DataSpec("imagefolder", len(classes), 3, (image_size, image_size), IMAGENET_MEAN, IMAGENET_STD,
                    crop_padding=image_size // 8, flip=True)
    return ImageFolderTensors(train_samples, image_size), ImageFolderTensors(test_samples, image_size), spec


def _load_synthetic(cfg: SyntheticConfig) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    """Learnable random data: a smooth random prototype per class plus Gaussian pixel noise.

    Prototypes (std 48 around 128) are upsampled from 4x4 so random crops keep them recognisable;
    noise has std 40, so pixels have mean ~0.5 and std ~0.25 in [0, 1] units. Classes are balanced.
    """
    k, c, s = cfg.num_classes, cfg.channels, cfg.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    proto = F.interpolate(torch.randn(k, c, 4, 4, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    flat = proto.flatten(1)
    proto = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).view_as(proto)
    proto = proto * 48 + 128

    def draw(n: int) -> ImageTensors:
        targets = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        images = torch.empty(n, c, s, s, dtype=torch.uint8)
        for lo in range(0, n, 4096):  # in chunks: float copies of a 50k-image set would peak at gigabytes
            t = targets[lo:lo + 4096]
            images[lo:lo + 4096] = (proto[t] + 40 * torch.randn(len(t), c, s, s, generator=g)).round().clamp(0, 255)
        return ImageTensors(images, targets)

    train, test = draw(cfg.train_size), draw(cfg.test_size)
    spec = DataSpec("synthetic", k, c, (s, s), (0.5,) * c, (0.25,) * c, crop_padding=2, flip=False)
    return train, test, spec


def _load_composed(cfg: ComposedConfig) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    """LW-KD's synthesised simple dataset (METHODS §2.10) from scikit-learn's 8x8 digits, 1 channel uint8.

    The digits are first split into train and test pools exactly as the ``digits`` dataset does (fixed seeded
    stratified split), so no test image reuses a training digit. With ``num_classes`` C <= 10, class y is digit
    y: every pool image of the classes below C, scaled by the integer factor ``image_size // 8`` (nearest) and
    centred on a black ``image_size`` square. With C > 10, class y shows the digits ``y // 10`` and ``y % 10``
    side by side, each scaled by ``image_size // 16`` and drawn at random from its pool (a fixed seed per part,
    ``COMPOSED_PER_CLASS`` samples per class). Normalisation is measured on the training part.
    """
    k, s = cfg.num_classes, cfg.image_size
    train_pool, test_pool, _ = _load_digits()

    def compose(pool: ImageTensors, part: str, seed: int) -> ImageTensors:
        if k <= 10:
            keep = pool.targets < k
            digits, targets = pool.images[keep].unsqueeze(1), pool.targets[keep]  # [N, 1 digit, 1, 8, 8]
        else:
            g = torch.Generator().manual_seed(seed)
            targets = torch.arange(k).repeat_interleave(COMPOSED_PER_CLASS[part])
            order = torch.argsort(pool.targets, stable=True)
            counts = torch.bincount(pool.targets, minlength=10)
            starts = torch.cumsum(counts, 0) - counts

            def draw(d: torch.Tensor) -> torch.Tensor:  # a uniformly random pool image of each digit in d
                return pool.images[order[starts[d] + (torch.rand(len(d), generator=g) * counts[d]).long()]]

            digits = torch.stack([draw(targets // 10), draw(targets % 10)], dim=1)  # [N, 2 digits, 1, 8, 8]
        f = s // (8 * digits.shape[1])
        tiles = digits.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)
        strip = torch.cat(tiles.unbind(1), dim=-1)  # [N, 1, 8f, 8f·digits]
        h, w = strip.shape[-2:]
        images = torch.zeros(len(targets), 1, s, s, dtype=torch.uint8)
        images[..., (s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = strip
        return ImageTensors(images, targets)

    train, test = compose(train_pool, "train", 0), compose(test_pool, "test", 1)
    pixels = train.images.float() / 255
    spec = DataSpec("composed_digits", k, 1, (s, s), (pixels.mean().item(),), (pixels.std().item(),),
                    crop_padding=max(1, s // 16), flip=False)
    return train, test, spec


def load_splits(d: DataConfig, download: bool | None = None) -> Splits:
    """Load the configured dataset and carve a stratified held-out validation set from its training part.

    `d.root`: data folder (fashion_mnist defaults to Debian's install, CIFAR to ``~/.cache/mutualkd``;
    imagefolder needs it). `download` (default `d.download`) only applies to CIFAR. `d.image_size` sets the
    imagefolder resolution (default 224); other datasets have a fixed size, which it may only restate.
    """
    name, root, image_size = d.name, d.root, d.image_size
    download = d.download if download is None else download
    if name == "digits":
        train, test, spec = _load_digits()
    elif name == "fashion_mnist":
        train, test, spec = _load_fashion_mnist(root)
    elif name in ("cifar10", "cifar100"):
        train, test, spec = _load_cifar(name, root, download)
    elif name == "imagefolder":
        train, test, spec = _load_imagefolder(root, image_size or 224)
    elif name == "composed_digits":
        train, test, spec = _load_composed(d.composed)
    else:
        train, test, spec = _load_synthetic(d.synthetic)
    if image_size is not None and spec.image_size != (image_size, image_size):
        raise UserError(f"data.image_size: {name} images are {spec.image_size[0]}x{spec.image_size[1]}, "
                        f"cannot use {image_size}")

    val = None
    if d.val_split > 0:
        keep, held = stratified_split(train.targets, d.val_split, d.split_seed)
        train, val = train.subset(keep), train.subset(held)
    return Splits(train, val, test, spec)
