"""Search: optimizers behind one ask/tell interface, and studies stored in Optuna."""
