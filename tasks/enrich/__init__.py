"""The enrich stage: item embeddings, PCA tables and LLM user profiles (vLLM, batch, incremental).

Its face: the settings, `run_enrich` (the stage in this process) and its summary, `EnrichOutputs` (the
reader of WORKSPACE/enrich that the train and publish stages use), the plan and shard functions that the
flow runs as task runs (`plan_enrich`, `run_shards`), and the model helpers of `bridgerec models`. Other
packages import this package only, never its modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
