"""Datasets, held-out split, batch samplers and batched tensor augmentation.

Datasets keep (or decode to) uint8 ``[C,H,W]`` images and hand out whole batches through
``__getitems__``, so a DataLoader with ``collate_fn=identity_collate`` costs one tensor index op
per batch. Augmentation runs afterwards on batched tensors (on the training device), with all
randomness drawn from an explicit ``torch.Generator`` so that runs are reproducible.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mutualkd.errors import UserError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "composed_digits")
SAMPLERS = ("random", "m_per_class")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR_DEFAULT_ROOT = "~/.cache/mutualkd"  # where CIFAR lives (and is downloaded to) without data.root

# Digits: measured once over all pixels of the 1,438-image train part (fixed test split below), in [0,1] units.
DIGITS_MEAN, DIGITS_STD = 0.3055, 0.3759
DIGITS_TEST_FRACTION, DIGITS_TEST_SEED = 0.2, 0
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_DEFAULTS = {"num_classes": 10, "train_size": 512, "test_size": 256, "image_size": 32, "channels": 3,
                      "seed": 0}
COMPOSED_DEFAULTS = {"num_classes": 10, "image_size": 16}
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


def identity_collate(batch: Any) -> Any:
    """DataLoader collate for datasets whose ``__getitems__`` already returns a batch dict."""
    return batch


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
    spec = DataSpec("digits", 10, 1, (8, 8), (DIGITS_MEAN,), (DIGITS_STD,), crop_padding=1, flip=False)
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
    spec = DataSpec("fashion_mnist", 10, 1, size, (0.2860,), (0.3530,), crop_padding=2, flip=True)
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


def _load_synthetic(cfg: dict[str, Any] | None) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    """Learnable random data: a smooth random prototype per class plus Gaussian pixel noise.

    Prototypes (std 48 around 128) are upsampled from 4x4 so random crops keep them recognisable;
    noise has std 40, so pixels have mean ~0.5 and std ~0.25 in [0, 1] units. Classes are balanced.
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise UserError(f"data.synthetic: unknown key(s) {', '.join(unknown)} "
                        f"(allowed: {', '.join(SYNTHETIC_DEFAULTS)})")
    cfg = {**SYNTHETIC_DEFAULTS, **cfg}
    for key, value in cfg.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
            raise UserError(f"data.synthetic.{key}: expected a positive integer, got {value!r}")
    k, c, s = cfg["num_classes"], cfg["channels"], cfg["image_size"]
    g = torch.Generator().manual_seed(cfg["seed"])
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

    train, test = draw(cfg["train_size"]), draw(cfg["test_size"])
    spec = DataSpec("synthetic", k, c, (s, s), (0.5,) * c, (0.25,) * c, crop_padding=2, flip=False)
    return train, test, spec


def _load_composed(cfg: dict[str, Any] | None) -> tuple[ImageTensors, ImageTensors, DataSpec]:
    """LW-KD's synthesised simple dataset (METHODS §2.10) from scikit-learn's 8x8 digits, 1 channel uint8.

    The digits are first split into train and test pools exactly as the ``digits`` dataset does (fixed seeded
    stratified split), so no test image reuses a training digit. With ``num_classes`` C <= 10, class y is digit
    y: every pool image of the classes below C, scaled by the integer factor ``image_size // 8`` (nearest) and
    centred on a black ``image_size`` square. With C > 10, class y shows the digits ``y // 10`` and ``y % 10``
    side by side, each scaled by ``image_size // 16`` and drawn at random from its pool (a fixed seed per part,
    ``COMPOSED_PER_CLASS`` samples per class). Normalisation is measured on the training part.
    """
    cfg = {**COMPOSED_DEFAULTS, **(cfg or {})}
    k, s = cfg["num_classes"], cfg["image_size"]
    if not 2 <= k <= 100:
        raise UserError(f"data.composed.num_classes: must be in 2..100, got {k}")
    if s < (16 if k > 10 else 8):
        raise UserError(f"data.composed.image_size: {'two-digit classes (num_classes > 10)' if k > 10 else 'a digit'} "
                        f"need image_size >= {16 if k > 10 else 8}, got {s}")
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


def load_configured(d, download: bool | None = None) -> Splits:
    """`load_splits` for a `config.DataConfig` (`download` overrides the config's flag)."""
    return load_splits(d.name, root=d.root, download=d.download if download is None else download,
                       val_split=d.val_split, split_seed=d.split_seed, image_size=d.image_size,
                       synthetic=d.synthetic.model_dump() if d.name == "synthetic" else None,
                       composed=d.composed.model_dump() if d.name == "composed_digits" else None)


def load_splits(name: str, root: str | None = None, download: bool = False, val_split: float = 0.1,
                split_seed: int = 0, image_size: int | None = None,
                synthetic: dict[str, Any] | None = None, composed: dict[str, Any] | None = None) -> Splits:
    """Load dataset ``name`` and carve a stratified held-out validation set from its training part.

    ``root``: data folder (fashion_mnist defaults to Debian's install, CIFAR to ``~/.cache/mutualkd``;
    imagefolder needs it). ``download`` only applies to CIFAR. ``image_size`` sets the imagefolder
    resolution (default 224); other datasets have a fixed size, which it may only restate.
    ``synthetic`` configures the ``synthetic`` dataset (see SYNTHETIC_DEFAULTS), ``composed`` the
    ``composed_digits`` one (see COMPOSED_DEFAULTS).
    """
    if name not in DATASETS:
        raise UserError(f"data.name: unknown dataset {name!r} (allowed: {', '.join(DATASETS)})")
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 0.5:
        raise UserError(f"data.val_split: must be a fraction in [0, 0.5), got {val_split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"data.image_size: must be a positive integer, got {image_size!r}")
    if synthetic and name != "synthetic":
        raise UserError(f"data.synthetic: only used with data.name=synthetic, not {name}")
    if composed and name != "composed_digits":
        raise UserError(f"data.composed: only used with data.name=composed_digits, not {name}")

    if name == "digits":
        train, test, spec = _load_digits()
    elif name == "fashion_mnist":
        train, test, spec = _load_fashion_mnist(root)
    elif name in ("cifar10", "cifar100"):
        train, test, spec = _load_cifar(name, root, download)
    elif name == "imagefolder":
        train, test, spec = _load_imagefolder(root, image_size or 224)
    elif name == "composed_digits":
        train, test, spec = _load_composed(composed)
    else:
        train, test, spec = _load_synthetic(synthetic)
    if image_size is not None and spec.image_size != (image_size, image_size):
        raise UserError(f"data.image_size: {name} images are {spec.image_size[0]}x{spec.image_size[1]}, "
                        f"cannot use {image_size}")

    val = None
    if val_split > 0:
        keep, held = stratified_split(train.targets, val_split, split_seed)
        train, val = train.subset(keep), train.subset(held)
    return Splits(train, val, test, spec)


# ----------------------------------------------------------------------------- samplers


class TrainBatchSampler:
    """Yields each rank's share of global training batches, deterministic from (seed, epoch).

    A global batch has ``batch_size * world_size`` samples; rank r gets the contiguous slice
    ``[r*batch_size:(r+1)*batch_size]``, so all ranks together see exactly the single-process batch.
    Only full global batches are produced (drop_last). ``kind="random"``: one permutation per epoch;
    ``kind="m_per_class"``: each global batch has ``global_batch // m`` random distinct classes with m
    samples each, drawn without replacement per class until the class's pool is exhausted and refilled.

    ``start_batch``: the next iteration skips that many batches (only indices are computed, no data is
    touched) and resets it to 0 - for resuming mid-epoch. ``len()`` is always the full epoch.
    """

    def __init__(self, targets: torch.Tensor | Sequence[int], batch_size: int, seed: int, kind: str = "random",
                 m: int = 2, rank: int = 0, world_size: int = 1) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.batch_size, self.seed, self.kind, self.m = batch_size, seed, kind, m
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0
        n, gb = len(self.targets), batch_size * world_size
        if kind not in SAMPLERS:
            raise UserError(f"data.sampler: unknown kind {kind!r} (allowed: {', '.join(SAMPLERS)})")
        if batch_size < 1:
            raise UserError(f"data.batch_size: must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if gb > n:
            raise UserError(f"data.batch_size: global batch {gb} (batch_size {batch_size} x {world_size} ranks) "
                            f"exceeds the {n} training samples")
        if kind == "m_per_class":
            self._members = class_members(self.targets)
            classes = len(self._members)
            if m < 1 or gb % m:
                raise UserError(f"data.m_per_class: global batch {gb} (data.batch_size {batch_size} x {world_size} "
                                f"ranks) is not a multiple of m={m}")
            if gb // m > classes:
                raise UserError(f"data.m_per_class: global batch {gb} / m={m} needs {gb // m} classes, "
                                f"only {classes} exist (lower data.batch_size or raise data.m_per_class)")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets) // (self.batch_size * self.world_size)

    def _global_batches(self) -> torch.Tensor:
        """All global batches of the current epoch as ``[num_batches, global_batch]`` indices."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        nb, gb = len(self), self.batch_size * self.world_size
        if self.kind == "random":
            return torch.randperm(len(self.targets), generator=g)[: nb * gb].view(nb, gb)
        m, members = self.m, self._members
        pools: list[list[int]] = [[] for _ in members]
        batches = []
        for _ in range(nb):
            batch: list[int] = []
            for c in torch.randperm(len(members), generator=g)[: gb // m].tolist():
                pool = pools[c]
                while len(pool) < m:  # refill: a fresh permutation, the leftovers' copies moved to its back
                    fresh = members[c][torch.randperm(len(members[c]), generator=g)].tolist()
                    left = set(pool)
                    pool += [i for i in fresh if i not in left] + [i for i in fresh if i in left]
                batch += pool[:m]
                del pool[:m]
            batches.append(batch)
        return torch.tensor(batches, dtype=torch.int64)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        if not 0 <= start <= len(self):
            raise UserError(f"resume: start_batch {start} outside the {len(self)} batches per epoch "
                            f"(did data.batch_size or the dataset change?)")
        lo = self.rank * self.batch_size
        for batch in self._global_batches()[start:]:
            yield batch[lo: lo + self.batch_size].tolist()


def eval_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rank r's contiguous block of ``range(n)``; block sizes differ by at most one, union is everything."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


# ----------------------------------------------------------------------------- augmentation


def _crop_flip(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor,
               flip: torch.Tensor | None) -> torch.Tensor:
    """Per-sample crop of the zero-padded images at (top, left), then optional horizontal flip.

    One advanced-indexing gather; flipping just reverses the gathered column indices.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    dev = images.device
    rows = top[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = left[:, None] + torch.arange(w, device=dev)  # [B, W]
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class BatchAugment:
    """Batched train augmentation (random zero-padded crop, horizontal flip) plus normalisation.

    Randomness comes only from the ``generator`` passed in, which must live on the images' device
    (``None`` uses torch's default generator of that device), so results are reproducible from its state.
    """

    def __init__(self, spec: DataSpec, crop_padding: int | None = None, flip: bool | None = None) -> None:
        self.spec = spec
        self.crop_padding = spec.crop_padding if crop_padding is None else crop_padding
        self.flip = spec.flip if flip is None else flip
        if self.crop_padding < 0:
            raise UserError(f"augment.crop_padding: must be >= 0, got {self.crop_padding}")
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _sample_params(self, n: int, device: torch.device, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw (top, left) crop offsets in [0, 2*padding] and the flip mask for n samples."""
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, n), device=device, generator=generator)
        flip = torch.rand(n, device=device, generator=generator) < 0.5 if self.flip else None
        return offsets[0], offsets[1], flip

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 ``(x/255 - mean) / std``, as one multiply-add with per-device cached constants."""
        if images.device not in self._affine:
            mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.spec.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
            self._affine[images.device] = (1 / (255 * std), -mean / std)
        scale, shift = self._affine[images.device]
        return torch.addcmul(shift, images.float(), scale)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.spec.mean):
            raise ValueError(f"expected uint8 [B,{len(self.spec.mean)},H,W], got {images.dtype} {tuple(images.shape)}")
        if train and (self.crop_padding or self.flip):
            top, left, flip = self._sample_params(len(images), images.device, generator)
            images = _crop_flip(images, self.crop_padding, top, left, flip)
        return self._normalise(images)

    def views(self, images: torch.Tensor, n: int, generator: torch.Generator | None) -> list[torch.Tensor]:
        """n independently augmented training views of the same batch (one per peer)."""
        return [self(images, generator, train=True) for _ in range(n)]


# ----------------------------------------------------------------------------- loaders


def _worker_init(worker_id: int) -> None:
    """Keep each loader worker to one intra-op thread so workers do not oversubscribe the CPU."""
    torch.set_num_threads(1)


def _loader(dataset: Dataset, batch_sampler: Any, num_workers: int) -> DataLoader:
    # A private generator: every iter() of a DataLoader draws a seed from it; from the global stream that draw
    # would shift dropout masks between an uninterrupted and a resumed run.
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=identity_collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, worker_init_fn=_worker_init if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def make_train_loader(dataset: Dataset, batch_sampler: TrainBatchSampler, num_workers: int = 0) -> DataLoader:
    """Training DataLoader: batches of dicts (image/target/index) chosen by ``batch_sampler``."""
    return _loader(dataset, batch_sampler, num_workers)


def make_eval_loader(dataset: Dataset, batch_size: int, indices: Sequence[int], num_workers: int = 0) -> DataLoader:
    """Evaluation DataLoader: consecutive batches of ``batch_size`` over ``indices``, in order, last one partial."""
    if batch_size < 1:
        raise UserError(f"eval.batch_size: must be >= 1, got {batch_size}")
    indices = list(indices)
    return _loader(dataset, [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)], num_workers)
