"""Run reports: the static HTML trace viewer (report.html)."""

from .html import write_report

__all__ = ["write_report"]
