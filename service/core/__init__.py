"""The detection core (docs/architecture.md): score registry, baselines, bundles, calibration,
scoring and the decision. No HTTP and no attacks: `service.serve` and `service.lab` build on it."""
