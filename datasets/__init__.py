"""Dataset adapters and the plate-shard format (knows numpy, pyarrow and fsspec only)."""
