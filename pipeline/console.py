"""What the commands print: progress bars, tables, one-line errors. The stage CLIs take these
from here, not from `pipeline.cli`, which imports them (the entry point registers the stage
commands; nothing imports it back)."""

from __future__ import annotations


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A table on the terminal: the first column as text, the others numbers to 3 decimals
    (None shows as "-")."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0], no_wrap=True)
    for c in columns[1:]:
        table.add_column(c, justify="right", no_wrap=True)
    for first, *values in rows:
        table.add_row(str(first), *("-" if v is None else f"{v:.3f}" for v in values))
    Console().print(table)


def error_line(e: BaseException) -> str:
    """One line for a user error: an OS error (disk full, read-only, permission, a folder
    where a file was expected) names its path and the reason, without a traceback."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else "writing"
        return f"{where}: {e.strerror}" + (f" (errno {e.errno})" if e.errno else "")
    return str(e) or type(e).__name__
