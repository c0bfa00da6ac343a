"""Trainable video models behind one adapter interface (adapter.py); one module per family."""
