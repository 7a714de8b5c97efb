"""Terminal rendering for the CLI: progress bars and tables (rich)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sagas.order_fulfilment.demo.run import DemoReport

__all__ = ["DemoProgress", "print_demo_report"]


class DemoProgress:
    """A progress bar of sagas ended out of orders placed, on stderr."""

    def __init__(self, orders: int) -> None:
        self._progress = Progress(
            TextColumn("sagas ended"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("demo", total=orders)

    def __enter__(self) -> DemoProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, ended: int, total: int) -> None:
        self._progress.update(self._task, completed=ended, total=total)


def print_demo_report(report: DemoReport) -> None:
    console = Console()
    table = Table(title=f"{report.orders} orders in {report.elapsed_s:.1f} s")
    table.add_column("order kind")
    table.add_column("outcome")
    table.add_column("orders", justify="right")
    for kind, outcomes in report.by_kind.items():
        for outcome, count in sorted(outcomes.items()):
            table.add_row(kind, outcome, str(count))
    console.print(table)
    summary = Table(show_header=False, box=None)
    for label, value in (
        ("completed", report.completed),
        ("compensated", report.compensated),
        ("needs attention", report.needs_attention),
        ("dead-lettered", report.dead_lettered),
        ("not ended", report.not_terminal),
        ("duplicate effects", report.duplicate_effects),
        ("unexpected outcomes", report.unexpected_outcomes),
    ):
        summary.add_row(label, str(value))
    console.print(summary)
    verdict = "[green]all sagas ended, no effect twice[/]" if report.ok else "[red]FAILED[/]"
    console.print(verdict)
