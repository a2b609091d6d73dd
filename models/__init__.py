"""Shipped model bundles: architecture code, weights, cards, calibrations, training scripts."""
