"""Research studies that train models to answer a question (model comparison, fine-tune settings, CDaT); not part
of the installed product: run them from a checkout as `python -m studies.NAME`, their results pages are written by
these commands."""
