"""Diag-LinUCB exploration statistics and the user-cluster contexts they are keyed on."""
