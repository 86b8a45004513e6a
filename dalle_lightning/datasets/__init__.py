"""Where datasets live and how shards are written, fingerprinted and recorded."""
