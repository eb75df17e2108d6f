"""The exporter: hourly table rotation and verified hourly Parquet files."""
