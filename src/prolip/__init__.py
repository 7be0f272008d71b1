"""prolip: few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP)."""

__version__ = "0.1.0"
