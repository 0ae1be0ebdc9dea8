"""Data: datasets from the typed `DataConfig` (`datasets`), batch samplers (`samplers`), batched augmentation
(`augment`) and loaders (`loaders`)."""

from mutualkd.data.augment import BatchAugment, _crop_flip
from mutualkd.data.datasets import (
    FASHION_MNIST_ROOT,
    DataSpec,
    ImageDataset,
    ImageFolderTensors,
    ImageTensors,
    Splits,
    class_members,
    load_splits,
    read_idx,
    stratified_split,
)
from mutualkd.data.loaders import identity_collate, make_eval_loader, make_train_loader
from mutualkd.data.samplers import TrainBatchSampler, eval_indices

__all__ = [
    "FASHION_MNIST_ROOT", "BatchAugment", "DataSpec", "ImageDataset", "ImageFolderTensors", "ImageTensors", "Splits",
    "TrainBatchSampler", "_crop_flip", "class_members", "eval_indices", "identity_collate", "load_splits",
    "make_eval_loader", "make_train_loader", "read_idx", "stratified_split",
]
