"""gradsae: gradient-based influence of SAE latents."""

__version__ = "0.1.0"
