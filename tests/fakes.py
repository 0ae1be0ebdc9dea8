"""Small files in the official formats of datasets that cannot be downloaded here."""

import os
import pickle

import numpy as np


def write_cifar(root, name, n_per_file=6):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        folder, key, k = "cifar-10-batches-py", b"labels", 10
    else:
        folder, files, key, k = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    os.makedirs(root / folder)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, k, n_per_file))
        with open(root / folder / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"batch_label": f.encode()}, fh)
        written[f] = (data, labels)
    return written
