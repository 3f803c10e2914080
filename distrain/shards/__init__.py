"""WebDataset shards: build them from image folders, CSV files or known datasets; read their manifest."""
