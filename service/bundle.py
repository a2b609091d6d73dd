"""The public import path of bundles (docs/python.md): `from service.bundle import load_bundle`."""

from service.core.bundle import SHIPPED, Bundle, BundleError, load_bundle, resolve, sha256_file

__all__ = ["SHIPPED", "Bundle", "BundleError", "load_bundle", "resolve", "sha256_file"]
