"""The bottom layer: logging, progress bars and the Prefect environment, imported by every layer above."""
