"""The MEG trainer: typed configuration, the training loop, the distributed runtime and tools."""
