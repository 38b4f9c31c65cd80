"""Backend-agnostic contracts: behaviour every implementation of a seam must show."""
