"""The night report: each night's figures kept as a record (WORKSPACE/nights/<night_id>.json) and shown
on one self-contained HTML page (WORKSPACE/reports/<night_id>.html) with plots across the kept nights.

Its face: `ReportSettings`, `collect_night` (the record, from the nightly flow's summary), `save_night`,
`build_report` -> the page's path, `ReportMissing` (no such night). Nothing outside this package imports
its other modules.
"""

from bridgerec.tasks.report.page import build_report, report_path
from bridgerec.tasks.report.record import ReportMissing, collect_night, load_nights, save_night
from bridgerec.tasks.report.settings import ReportSettings

__all__ = [
    "ReportMissing",
    "ReportSettings",
    "build_report",
    "collect_night",
    "load_nights",
    "report_path",
    "save_night",
]
