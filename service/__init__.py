"""FisherGuard: Fisher-information detection of adversarial inputs, as a library and a service."""

__version__ = "0.1.0"
