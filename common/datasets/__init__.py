"""Datasets as plugins (FLamby style): one module per dataset, looked up by name in `common.datasets.registry`.

This package init imports nothing, so `common.config` can validate names against
`common.datasets.names` without loading any reader.
"""
