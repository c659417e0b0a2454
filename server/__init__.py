"""histofed server: the coordinator (Flower ServerApp), strategy, pooled metrics and run directory."""
