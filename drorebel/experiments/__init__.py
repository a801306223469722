"""drorebel.experiments."""
