"""Stage one, part two: zarr store -> WebDataset shards."""
