"""What several test modules share (as optuna/testing/): no test module imports another."""
