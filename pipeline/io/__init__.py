"""Atomic Parquet files and appendable, deduplicated Parquet datasets."""

from pipeline.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from pipeline.io.parquet import ParquetDataset, read_table, remove_stale_tmp, write_table_atomic

__all__ = [
    "ParquetDataset",
    "atomic_path",
    "read_table",
    "remove_stale_tmp",
    "write_json_atomic",
    "write_table_atomic",
    "write_text_atomic",
]
