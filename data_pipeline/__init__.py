"""Data reading and writing: converters to WebDataset shards, manifests, and the sharded stream."""
