"""drorebel.trainer."""
