"""histofed common: pure ML shared by server and clients (config, model, data, training, metrics)."""
