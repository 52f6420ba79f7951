"""Checks around training and publishing, run by the nightly flow: data checks on tonight's ingest
output against the last good night (`check_data`), the quality gate before publishing (`run_gate`),
and the stability and coverage of what was published (`list_stability`).

Its face: the settings (`DataCheckSettings`, `GateSettings`), those functions and their result types.
Nothing outside this package imports its other modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
