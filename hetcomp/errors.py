"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class HetcompError(Exception):
    """An error caused by the user's input (a bad file, an unsupported model, a bad flag)."""
