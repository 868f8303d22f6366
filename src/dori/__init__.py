"""dori: find, attack and remove memorized training images in text-to-image diffusion models."""

__version__ = "0.1.0"
