"""drorebel.reference."""
