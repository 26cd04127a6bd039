"""cmath-prepare: a text front-end from conversation CSVs to cmath's feature format.

csv_source (read + group + order rows, cmath_runtime.text_clean) -> labels / speakers -> text_encoder (+ embedding_cache,
optional finetune) -> build (FeatureSet, save_features) -> cli; probe gives a context-free sanity number.
Nothing is imported here, so `cmath_train.prepare.speakers` loads without torch.
"""
