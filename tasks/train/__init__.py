"""The train stage: train one model on the ingest and enrich outputs, evaluate it, record the run
(WORKSPACE/train/ and WORKSPACE/runs/<run_id>/).

Its face: `TrainSettings` (and `MODEL_PRESETS`), `check_train_inputs` and `run_train` -> `TrainSummary`,
and `TrainOutputs`, the reader later stages use (best run, exported vectors, metrics), and the scores the
nightly quality gate compares (`run_validation_ndcg10`, `popularity_validation_ndcg10` on `Tonight`'s
validation split; `popularity_validation_by_domain` for the night report). Nothing outside this package
imports its other modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
