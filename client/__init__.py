"""histofed client: the hospital side (Flower ClientApp) that trains on local data only."""
