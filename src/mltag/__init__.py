"""mltag: multi-label image classification by transfer learning."""

__version__ = "0.1.0"
