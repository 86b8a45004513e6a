"""Reading datasets for training and inference: image transforms, Parquet streams.

Resumable training streams share their order, split and resume position
(:mod:`.shard_stream`): images for the dVAE (:mod:`.image_stream`), caption and
image tokens for the transformer (:mod:`.token_stream`), and image–caption
pairs for CLIP (:mod:`.pair_stream`).
"""
