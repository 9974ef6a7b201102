"""Data-parallel and pipeline-parallel wrappers around the model."""
