"""The night report: each night's figures kept as a record (WORKSPACE/nights/<night_id>.json) and shown
on one self-contained HTML page (WORKSPACE/reports/<night_id>.html) with plots across the kept nights.

Its face: `ReportSettings`, `collect_night` (the record, from the nightly flow's summary), `save_night`,
`build_report` -> the page's path, `ReportMissing` (no such night). Nothing outside this package imports
its other modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
