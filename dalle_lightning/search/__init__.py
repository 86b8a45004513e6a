"""Natural-language search over a dataset's images by their CLIP embeddings (``dalle search``)."""
