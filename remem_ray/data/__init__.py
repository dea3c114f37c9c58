"""Datasets (a registry of seeded splits) and the pipelines that turn them into batches."""

from remem_ray.data.augment import EvalResize, TrainAugment, augment_for
from remem_ray.data.datasets import (
    DATASETS,
    DataSplits,
    TensorImages,
    TransformedSubset,
    build_datasets,
    dataset_targets,
    num_items,
    register_dataset,
)
from remem_ray.data.pipeline import (
    DataPipeline,
    DevicePipeline,
    FixedViews,
    LoaderPipeline,
    Shard,
    Views,
    build_pipeline,
    device_store_bytes,
    loader_workers,
)

__all__ = [
    "DATASETS",
    "DataPipeline",
    "DataSplits",
    "DevicePipeline",
    "EvalResize",
    "FixedViews",
    "LoaderPipeline",
    "Shard",
    "TensorImages",
    "TrainAugment",
    "TransformedSubset",
    "Views",
    "augment_for",
    "build_datasets",
    "build_pipeline",
    "dataset_targets",
    "device_store_bytes",
    "loader_workers",
    "num_items",
    "register_dataset",
]
