"""Many releases at once: fan-out of builds, release plans against git."""
