"""The web page's gallery of example images (written by `fisherguard examples`)."""

import json
from pathlib import Path

STATIC = Path(__file__).parent / "static"
GALLERY = STATIC / "examples"


def gallery_urls(bundle_name: str) -> list[dict[str, object]]:
    """The gallery entries of a bundle with their URLs; none when it has no gallery."""
    index = GALLERY / bundle_name / "index.json"
    if not index.is_file():
        return []
    return [e | {"url": f"/static/examples/{bundle_name}/{e['file']}"} for e in json.loads(index.read_text())]
