"""Training recipes of the shipped bundles (docs/training.md): `mnist`, `cifar10`, and their shared loop."""
