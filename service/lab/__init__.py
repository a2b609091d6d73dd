"""The offline laboratory (docs/architecture.md#lab): attacks, adaptive attacks, the evaluation
harness, calibration runs, inspection, the gallery, data loading and training. Never imported by
the service (`service.serve`)."""
