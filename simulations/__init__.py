"""histofed simulations: named multi-center scenarios and the `flower-sim` command (drives the same Flower app)."""
