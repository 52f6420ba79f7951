"""bridgerec: LLM-bridged cross-domain sequential recommendation as a nightly batch pipeline."""

__version__ = "0.1.0"
