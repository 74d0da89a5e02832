"""SAE training: activations -> trainer (the loss and one step) -> loop (the run) -> evaluate -> export."""
