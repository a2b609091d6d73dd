"""The HTTP service (docs/architecture.md#serve): routes parse and shape, a handler layer decides,
the batcher feeds the engine. Builds on `service.core`; never imports `service.lab`."""
