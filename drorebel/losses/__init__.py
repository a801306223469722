"""drorebel.losses."""
