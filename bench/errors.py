"""The one exception type that means "the user asked for something invalid": exit code 2, one line, no traceback;
and the "did you mean" hint its messages give for a misspelt name."""


class UsageError(Exception):
    """Bad usage or bad input (a wrong flag, a broken suite file, a corrupt dataset). The CLI prints
    `learnbench: error: <message>` on stderr and exits with code 2 before writing anything."""


def did_you_mean(names: object, choices: object) -> str:
    """` (did you mean 'kolen-pollack'?)` for a misspelt name (or a list of them: one suggestion per name that has
    one) close to one of `choices`, else ''. Keeps a usage error on one line."""
    import difflib

    options = [str(c) for c in choices]
    wanted = [names] if isinstance(names, str) else [str(n) for n in names]
    close = [(n, difflib.get_close_matches(n, options, n=1)) for n in wanted]
    hints = [(n, c[0]) for n, c in close if c]
    if not hints:
        return ""
    if len(wanted) == 1:
        return f" (did you mean {hints[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{c!r} for {n!r}" for n, c in hints) + "?)"
