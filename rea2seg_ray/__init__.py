"""Rea2Seg on Ray."""
