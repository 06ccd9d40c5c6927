"""Datasets, loaders, transforms, readers of the supported data formats, and synthetic generators."""

from luoshu.data import transforms
from luoshu.data.criteo import (
    CriteoDataset,
    ctr_from_columns,
    ctr_to_columns,
    iter_criteo,
    read_criteo,
    write_criteo,
)
from luoshu.data.dataset import ArrayDataset, Dataset, IterableDataset, Subset, TensorDataset, random_split, rebatch
from luoshu.data.errors import DataError
from luoshu.data.loader import DataLoader, default_collate
from luoshu.data.movielens import read_movielens
from luoshu.data.packing import BucketGroup, PackedRows, bucket_batch, bucketize, pack_sequences
from luoshu.data.parquet import ParquetDataset, write_ctr_parquet, write_parquet
from luoshu.data.synthetic import copy_task, corpus_lengths, pad_sequences, synthetic_ctr, synthetic_sequences
from luoshu.data.vision import CIFAR10, CIFAR100, MNIST, load_digits, read_cifar_bin, read_idx

__all__ = [
    "CIFAR10", "CIFAR100", "MNIST", "ArrayDataset", "BucketGroup", "CriteoDataset", "DataError", "DataLoader",
    "Dataset", "IterableDataset", "PackedRows", "ParquetDataset", "Subset", "TensorDataset", "bucket_batch",
    "bucketize", "copy_task", "ctr_from_columns", "ctr_to_columns", "default_collate", "iter_criteo", "load_digits",
    "pack_sequences", "pad_sequences", "random_split", "read_cifar_bin", "read_criteo", "read_idx", "read_movielens",
    "rebatch", "synthetic_ctr", "corpus_lengths", "synthetic_sequences", "transforms", "write_criteo",
    "write_ctr_parquet", "write_parquet",
]
