"""Files: model checkpoints (safetensors reader/writer), Zarr activation stores, HDF5 statistics,
calibration data, and the one atomic writer everything goes through."""
