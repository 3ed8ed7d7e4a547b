"""Output stage: tokens -> Parquet files, commit markers and records in the output folder."""
