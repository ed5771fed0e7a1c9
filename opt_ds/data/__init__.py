"""Data layer: shard writing, streaming, decoding and collation of image-text-audio samples."""
