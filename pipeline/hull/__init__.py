"""hull stage."""
