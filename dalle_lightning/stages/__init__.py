"""Stage logic: plain functions over shard paths and Arrow tables. No Prefect here."""
