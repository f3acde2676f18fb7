"""Backbones: the built-in EfficientNet-Lite modules, their weights, and the handle resolver."""
