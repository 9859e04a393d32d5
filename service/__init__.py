"""shapstream gateway and the core it shares with the workers."""
