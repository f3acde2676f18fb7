"""Inference: the backbone engines (TF, LiteRT), the lanes that feed them, the end-to-end model and its export."""
