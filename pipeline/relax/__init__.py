"""relax stage."""
