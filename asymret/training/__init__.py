"""Losses by name, miners, samplers, cached gallery embeddings, the trainer.

May import ``asymret.retrieval`` and ``asymret.index``; never ``api``.
"""
