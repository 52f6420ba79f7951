"""The enrich stage: item embeddings, PCA tables and LLM user profiles (vLLM, batch, incremental).

The train stage reads it through `load_item_tables` and `load_profile_vectors`."""

from bridgerec.tasks.enrich.tables import load_item_tables, load_profile_vectors

__all__ = ["load_item_tables", "load_profile_vectors"]
