"""Where datasets live and how shards are written, fingerprinted and recorded.

A dataset root is a local folder or any fsspec URL (``s3://bucket/prefix``).
Object stores are opened without fsspec's directory-listing cache: shards are
written by other processes (Dask workers, a later run), and a listing cached
in a long-lived process would hide them — a missed shard, a finished shard
taken for missing, a read refused because the cached ETag is out of date.
A user's own ``fsspec`` configuration for the protocol still wins.
"""

import fsspec.config

for _protocol in ("s3", "gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
