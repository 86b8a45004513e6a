"""Reading datasets for training and inference: image transforms, Parquet streams."""
