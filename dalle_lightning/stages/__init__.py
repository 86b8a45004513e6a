"""Pipeline stages: plain functions over shard paths and Arrow tables (sources, download, filter, …).

A stage does not know who runs it: ``flows/`` wires these functions into
Prefect tasks and picks Dask or local execution (STYLE.md 2).
"""
