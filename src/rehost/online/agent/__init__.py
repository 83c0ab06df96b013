"""The source-side agent; Python 3.6+ and the standard library only (see protocol.py)."""
