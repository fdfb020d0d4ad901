"""One module per top-level subcommand of ``asymret``.

Each module defines ``register(subparsers)`` which adds its parser and sets ``func`` (called with
the parsed namespace, returns an exit status). The CLI discovers the modules; adding a command
never edits a shared file.
"""
