"""GhostNetV2 model constructors and the official checkpoint loader."""

from .ghostnetv2 import ghostnetv2, ghostnetv2_100, ghostnetv2_130, ghostnetv2_160, load_official

__all__ = ["ghostnetv2", "ghostnetv2_100", "ghostnetv2_130", "ghostnetv2_160", "load_official"]
