"""cmath-prepare: a text front-end from conversation CSVs to cmath's feature format.

csv_source (read + group + order rows) -> labels / speakers -> text_encoder (+ embedding_cache, optional
finetune) -> build (FeatureSet, save_features) -> cli.
"""

from .build import PrepareOptions, prepare_features
from .csv_source import CsvColumns, read_conversations
from .finetune import FinetuneOptions

__all__ = ["CsvColumns", "FinetuneOptions", "PrepareOptions", "prepare_features", "read_conversations"]
