from .page import build_report, report_path
from .record import ReportMissing, collect_night, load_nights, save_night
from .settings import ReportSettings

__all__ = [
    "ReportMissing",
    "ReportSettings",
    "build_report",
    "collect_night",
    "load_nights",
    "report_path",
    "save_night",
]
