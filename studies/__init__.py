"""Not part of the installed product; run from a checkout as `python -m studies.NAME`. Research studies that train
models to answer a question (model comparison, fine-tune settings, CDaT, accuracy levers), and the maintainer commands
that write results pages from runs: `accuracy` (the accuracy page from runs' metrics.json) and `readme` (the README's
generated tables)."""
