"""Checks between training and publishing: the quality gate (tasks/quality/gate.py)."""
