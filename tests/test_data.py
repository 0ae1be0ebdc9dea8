"""Tests for mutualkd.data: datasets on real and written-on-the-fly files, splits, samplers, augmentation."""

import gzip
import os

import numpy as np
import pytest
import torch
from fakes import write_cifar

from mutualkd.config import validate
from mutualkd.data import (
    FASHION_MNIST_ROOT,
    BatchAugment,
    DataSpec,
    ImageTensors,
    TrainBatchSampler,
    _crop_flip,
    eval_indices,
    identity_collate,
    load_splits,
    make_eval_loader,
    make_train_loader,
    read_idx,
    stratified_split,
)
from mutualkd.errors import UserError


def load(name, **data):
    """The splits of `data.name=name` plus other `data.*` keys, validated like any config."""
    return load_splits(validate({"data": {"name": name, **data}}).data)


def class_counts(ds, k):
    return torch.bincount(ds.targets, minlength=k)


# ----------------------------------------------------------------------------- digits and splitting


def test_digits_sizes_stratification_and_range():
    s = load("digits", val_split=0.1, split_seed=3)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert abs(len(s.test) - 360) <= 1
    assert s.spec == DataSpec("digits", 10, 1, (8, 8), s.spec.mean, s.spec.std, 1, False)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 8, 8)
    assert s.train.images.max() == 255 and s.train.images.min() == 0
    full = class_counts(s.train, 10) + class_counts(s.val, 10)
    assert torch.equal(class_counts(s.val, 10), torch.tensor([round(n * 0.1) for n in full.tolist()]))
    # the test split ignores split_seed and val_split
    t = load("digits", val_split=0.0, split_seed=99)
    assert t.val is None and torch.equal(t.test.images, s.test.images) and len(t.train) == len(s.train) + len(s.val)


def test_splits_are_deterministic_and_seed_dependent():
    a, b = load("digits", split_seed=1), load("digits", split_seed=1)
    c = load("digits", split_seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.val.images, c.val.images)


def test_stratified_split_exact_and_at_least_one():
    targets = torch.tensor([0] * 50 + [1] * 7 + [2] * 2 + [3] * 1)
    keep, held = stratified_split(targets, 0.1, seed=0)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(targets)))
    assert torch.bincount(targets[held], minlength=4).tolist() == [5, 1, 1, 0]


# ----------------------------------------------------------------------------- fashion-mnist and idx


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT),
                    reason=f"{FASHION_MNIST_ROOT} missing (install Debian package dataset-fashion-mnist)")
def test_fashion_mnist_real():
    s = load("fashion_mnist", val_split=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.images.shape[1:] == (1, 28, 28) and s.test.images.dtype == torch.uint8
    assert set(s.test.targets.unique().tolist()) == set(range(10))
    assert class_counts(s.val, 10).tolist() == [600] * 10
    mean = torch.cat([s.train.images, s.val.images]).float().div(255).mean().item()
    assert abs(mean - 0.2860) < 1e-3


def write_idx(path, array, magic=None):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) if magic is None else magic
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_parser(tmp_path, suffix):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f"a{suffix}", a)
    assert np.array_equal(read_idx(str(tmp_path / f"a{suffix}")), a)
    b = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / f"b{suffix}", b)
    assert np.array_equal(read_idx(str(tmp_path / f"b{suffix}")), b)


def test_idx_parser_rejects_bad_files(tmp_path):
    a = np.zeros((2, 2), dtype=np.uint8)
    write_idx(tmp_path / "bad", a, magic=b"\x01\x00\x08\x02")
    with pytest.raises(UserError, match="bad magic"):
        read_idx(str(tmp_path / "bad"))
    write_idx(tmp_path / "short", a)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(UserError, match="short.*truncated"):
        read_idx(str(tmp_path / "short"))
    write_idx(tmp_path / "cut.gz", a)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:-12])
    with pytest.raises(UserError, match="cannot read .*cut.gz"):
        read_idx(str(tmp_path / "cut.gz"))


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"data.root: .* has no train-images-idx3-ubyte\[.gz\]"):
        load("fashion_mnist", root=str(tmp_path))


def test_fashion_mnist_from_written_idx(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    s = load("fashion_mnist", root=str(tmp_path), val_split=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)


# ----------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_official_pickles(tmp_path, name):
    written = write_cifar(tmp_path, name)
    s = load(name, root=str(tmp_path), val_split=0.0)
    n_train = 30 if name == "cifar10" else 6
    assert s.train.images.shape == (n_train, 3, 32, 32) and s.test.images.shape == (6, 3, 32, 32)
    test_data, test_labels = written["test_batch" if name == "cifar10" else "test"]
    assert torch.equal(s.test.images, torch.from_numpy(test_data.reshape(6, 3, 32, 32)))
    assert s.test.targets.tolist() == [int(x) for x in test_labels]
    assert s.spec.num_classes == (10 if name == "cifar10" else 100) and s.spec.crop_padding == 4


def test_cifar_missing_root(tmp_path):
    with pytest.raises(UserError, match="data.download"):
        load("cifar10", root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(n):
                arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "gray.png")
    s = load("imagefolder", root=str(tmp_path), val_split=0.2, image_size=16)
    assert s.spec.num_classes == 2 and s.spec.image_size == (16, 16) and s.spec.crop_padding == 2
    assert len(s.train) + len(s.val) == 9 and len(s.test) == 4 and s.val.targets.tolist() == [0, 1]
    item = s.train[len(s.train) - 1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    batch = s.test.__getitems__([3, 0])
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["target"].tolist() == [1, 0] and batch["index"].tolist() == [3, 0]
    with pytest.raises(UserError, match="data.root"):
        load("imagefolder", root=str(tmp_path / "train"))


# ----------------------------------------------------------------------------- synthetic and errors


def test_synthetic_is_learnable():
    cfg = {"num_classes": 5, "train_size": 200, "test_size": 100, "image_size": 12}
    s = load("synthetic", synthetic=cfg)
    assert s.spec.num_classes == 5 and s.train.images.shape == (180, 3, 12, 12) and len(s.test) == 100
    x = s.train.images.float().flatten(1)
    centroids = torch.stack([x[s.train.targets == c].mean(0) for c in range(5)])
    assert torch.cdist(centroids, centroids).add(torch.eye(5) * 1e9).min() > 500  # distinct prototypes
    pred = torch.cdist(s.test.images.float().flatten(1), centroids).argmin(1)
    assert (pred == s.test.targets).float().mean() > 0.95
    again = load("synthetic", synthetic=cfg)
    assert torch.equal(again.test.images, s.test.images)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "mnist"}, "data.name.*digits"),
    ({"name": "digits", "val_split": 0.5}, "data.val_split"),
    ({"name": "digits", "image_size": 32}, "data.image_size"),
    ({"name": "synthetic", "synthetic": {"clases": 3}}, "data.synthetic.*clases"),
    ({"name": "imagefolder"}, "data.root"),
])
def test_load_splits_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        load(**kwargs)


# ----------------------------------------------------------------------------- samplers


def test_random_sampler_deterministic_per_epoch():
    targets = torch.arange(100) % 10
    a, b = TrainBatchSampler(targets, 8, seed=5), TrainBatchSampler(targets, 8, seed=5)
    assert len(a) == 12 and list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert all(len(batch) == 8 for batch in first) and len({i for batch in first for i in batch}) == 96
    assert list(TrainBatchSampler(targets, 8, seed=6)) != first


@pytest.mark.parametrize("kind", ["random", "m_per_class"])
def test_ranks_partition_global_batch(kind):
    targets = torch.arange(120) % 12
    single = TrainBatchSampler(targets, 12, seed=1, kind=kind, m=3)
    ranks = [TrainBatchSampler(targets, 6, seed=1, kind=kind, m=3, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(4)
    assert len(single) == len(ranks[0]) == 10
    for full, r0, r1 in zip(single, *ranks):
        assert full == r0 + r1


def test_m_per_class_composition():
    targets = torch.tensor([c for c in range(10) for _ in range(5 + c)])  # unequal class sizes
    s = TrainBatchSampler(targets, 12, seed=0, kind="m_per_class", m=3)
    batches = list(s)
    assert len(batches) == len(targets) // 12
    for batch in batches:
        counts = torch.bincount(targets[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3] and len(set(batch)) == 12
    with pytest.raises(UserError, match="data.m_per_class"):
        TrainBatchSampler(targets, 10, seed=0, kind="m_per_class", m=3)
    with pytest.raises(UserError, match="data.m_per_class"):
        TrainBatchSampler(targets, 22, seed=0, kind="m_per_class", m=2)


def test_start_batch_skips_to_tail():
    targets = torch.arange(64) % 4
    for kind in ("random", "m_per_class"):
        s = TrainBatchSampler(targets, 8, seed=2, kind=kind, m=2)
        s.set_epoch(3)
        full = list(s)
        s.start_batch = 5
        assert list(s) == full[5:]
        assert s.start_batch == 0 and list(s) == full and len(s) == 8


def test_eval_indices_shards():
    shards = [eval_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert eval_indices(2, 2, 3) == [] and eval_indices(5) == list(range(5))


# ----------------------------------------------------------------------------- augmentation

SPEC = DataSpec("t", 10, 3, (6, 7), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), crop_padding=2, flip=True)


def random_images(n=16, seed=0):
    return torch.randint(1, 256, (n, 3, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalise_ref(x):
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_eval_path_only_normalises():
    x = random_images()
    out = BatchAugment(SPEC)(x, None, train=False)
    assert out.dtype == torch.float32 and torch.allclose(out, normalise_ref(x), atol=1e-5)


def test_train_crop_and_flip_match_naive_loop():
    x, p = random_images(), SPEC.crop_padding
    aug = BatchAugment(SPEC)
    top, left, flip = aug._sample_params(len(x), x.device, torch.Generator().manual_seed(7))
    out = aug(x, torch.Generator().manual_seed(7), train=True)
    expected = []
    for i in range(len(x)):
        padded = torch.zeros(3, 6 + 2 * p, 7 + 2 * p, dtype=torch.uint8)
        padded[:, p:p + 6, p:p + 7] = x[i]
        crop = padded[:, top[i]:top[i] + 6, left[i]:left[i] + 7]
        expected.append(crop.flip(-1) if flip[i] else crop)
    assert torch.allclose(out, normalise_ref(torch.stack(expected)), atol=1e-5)
    assert len(set(zip(top.tolist(), left.tolist()))) > 5 and 0 < flip.sum() < len(x)


def test_crop_shifts_content_with_zeros_entering():
    x = random_images(1)
    out = _crop_flip(x, 2, torch.tensor([0]), torch.tensor([3]), None)  # down 2, left 1
    assert torch.equal(out[0, :, 2:, :6], x[0, :, :4, 1:])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, 6] == 0).all()


def test_flip_about_half_and_reproducible():
    x = random_images(2000)
    aug = BatchAugment(SPEC, crop_padding=0)
    out = aug(x, torch.Generator().manual_seed(0), train=True)
    same, flipped = normalise_ref(x), normalise_ref(x.flip(-1))
    is_same = torch.isclose(out, same, atol=1e-5).flatten(1).all(1)
    is_flipped = torch.isclose(out, flipped, atol=1e-5).flatten(1).all(1)
    assert (is_same ^ is_flipped).all() and 0.45 < is_flipped.float().mean() < 0.55
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0), train=True))
    v = BatchAugment(SPEC).views(x[:8], 2, torch.Generator().manual_seed(0))
    assert len(v) == 2 and not torch.equal(v[0], v[1])


# ----------------------------------------------------------------------------- datasets and loaders


def test_image_tensors_items_subset_and_loaders():
    x = random_images(10)
    ds = ImageTensors(x, torch.arange(10) % 3)
    item = ds[4]
    assert torch.equal(item["image"], x[4]) and item["target"].item() == 1 and item["index"].item() == 4
    sub = ds.subset([7, 2, 9])
    batch = sub.__getitems__([2, 0])
    assert torch.equal(batch["image"], x[[9, 7]]) and batch["index"].tolist() == [2, 0]
    assert identity_collate(batch) is batch

    loader = make_train_loader(ds, TrainBatchSampler(ds.targets, 4, seed=0))
    batches = list(loader)
    assert len(batches) == 2 and set(batches[0]) == {"image", "target", "index"}
    assert batches[0]["image"].shape == (4, 3, 6, 7)
    assert torch.equal(ds.targets[batches[0]["index"]], batches[0]["target"])

    ev = list(make_eval_loader(ds, 4, eval_indices(10, 1, 2)))
    assert [b["index"].tolist() for b in ev] == [[5, 6, 7, 8], [9]]


def test_loader_with_worker():
    ds = ImageTensors(random_images(12), torch.arange(12) % 3)
    sampler = TrainBatchSampler(ds.targets, 3, seed=0, kind="m_per_class", m=1)
    indices = [b["index"].tolist() for b in make_train_loader(ds, sampler, num_workers=1)]
    assert indices == list(sampler)


def test_m_per_class_tiny_class_still_gives_m():
    targets = torch.tensor([0] + [1] * 9 + [2] * 9)
    for epoch in range(5):
        s = TrainBatchSampler(targets, 6, seed=0, kind="m_per_class", m=2)
        s.set_epoch(epoch)
        for batch in s:
            assert torch.bincount(targets[batch], minlength=3).tolist() == [2, 2, 2]  # class 0 repeats its sample
