"""asymret: asymmetric image retrieval and re-identification.

A large *gallery* network encodes a database once, offline; a small *query* network encodes each
query at search time, into the same space. Layers (see docs/architecture.md), each a subpackage:
``api`` -> ``training`` -> ``retrieval`` -> ``index``; nothing imports upward.
"""

__version__ = "0.1.0"
