"""Shared by every stage: data contracts, COCO I/O, Parquet I/O, evaluation, CLI."""
