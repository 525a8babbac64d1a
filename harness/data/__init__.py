"""Step 4, the stream: Ray Data reads a rank's plate parts, the re-batcher forms batches, and they become
`methods.Batch` tensors (decoding, standardisation, augmentation, channel statistics)."""
