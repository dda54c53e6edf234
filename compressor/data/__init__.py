"""The data layer: reading splits from the data root, subsampling, encoding caches and multi-task sampling."""
