"""Images to embeddings to scores: encoders, dataset readers, the mini benchmark, metrics, evaluation.

May import ``asymret.index``; never ``training`` or ``api``.
"""
