"""Interfaces: the ``asymret`` command line and the FastAPI app, thin over the layers below."""
