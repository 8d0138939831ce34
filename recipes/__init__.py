"""Runnable recipes built on lightning_patterning."""
