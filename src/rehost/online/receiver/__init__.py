"""The destination-side receiver that runs in migration mode."""
