"""The one exception type that means "the user asked for something invalid": exit code 2, one line, no traceback."""


class UsageError(Exception):
    """Bad usage or bad input (a wrong flag, a broken suite file, a corrupt dataset). The CLI prints
    `learnbench: error: <message>` on stderr and exits with code 2 before writing anything."""
