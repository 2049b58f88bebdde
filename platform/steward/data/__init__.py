"""Data: sources (builtin:, file:, hf:), splits, tokenizers, and sharded batches for training and evaluation.

`prepare_data` runs once on the driver and returns a DataInfo (saved with the model); `load_splits` runs on
every worker and returns tensors; `encode_instances` encodes raw requests exactly as training saw them.
"""

from steward.data.encode import encode_instances
from steward.data.errors import DataError
from steward.data.info import DataInfo
from steward.data.prepare import load_splits, prepare_data, raw_inputs
from steward.data.split import Split

__all__ = ["DataError", "DataInfo", "Split", "encode_instances", "load_splits", "prepare_data", "raw_inputs"]
