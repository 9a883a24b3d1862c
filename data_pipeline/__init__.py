"""Data reading and writing: converters to shards + manifest, the sharded stream, and
``open_dataset(cfg.data)``, the one entry the trainer uses (data_pipeline/dataset.py)."""

_DATASET_NAMES = ("Dataset", "open_dataset", "write_toy_data")


def __getattr__(name: str):
    # Lazily: the config loader imports data_pipeline.config and must not pull in the stream (torch).
    if name in _DATASET_NAMES:
        from data_pipeline import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
