"""Vectors and their metadata: FAISS indices and the SQL metadata store.

Knows nothing about images or networks: imports neither torch models nor ``retrieval``.
"""
