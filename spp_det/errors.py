"""Errors that mean "the user's input or settings are wrong": the CLI prints their message
(which names the file or key and the problem) and exits with status 1, without a traceback."""


class UserError(Exception):
    """Bad input or settings; the message says which file or key, and what is wrong."""
