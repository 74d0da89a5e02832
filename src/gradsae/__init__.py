"""gradsae: gradient-based influence of SAE latents."""
