"""evomerge: evolutionary search over model-merge recipes."""

__version__ = "0.1.0"
