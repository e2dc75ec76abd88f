"""Errors the user can act on: the CLI prints their message as one line and exits with code 2."""


class QuantaError(Exception):
    """A known failure with a message fit for one line on stderr."""
