"""drorebel.ops."""
