"""Experiment configs: `get_config(arg=None)` returning a locked ConfigDict."""
