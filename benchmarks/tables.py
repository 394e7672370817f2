"""Print a benchmark table: markdown for RESULTS.md, rich for a terminal."""

from __future__ import annotations


def table(title: str, rows: list[list[str]], header: list[str], md: bool) -> None:
    if md:
        print(f"\n**{title}**\n\n| " + " | ".join(header) + " |")
        print("|---" * len(header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(*header, title=title)
    for row in rows:
        t.add_row(*row)
    Console().print(t)
