"""The enrich stage: item embeddings, PCA tables and LLM user profiles (vLLM, batch, incremental).

Its face: the settings, `run_enrich` (the stage: it runs its plan, shards and finish as steps of the run's
runner, so under a flow they are task runs) and its summary, `EnrichOutputs` (the reader of
WORKSPACE/enrich that the train and publish stages use), and the model helpers of `bridgerec models`.
Other packages import this package only, never its modules.
"""

# The face loads lazily (SPEC 1, `lazy_loader`): a name's module is imported on first use, so that
# `import bridgerec.config` (every command, `--help` included) reads the settings without torch, faiss,
# vLLM or matplotlib. The names and their modules are in __init__.pyi, which type checkers read.
import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
