"""Query-pattern monitoring (docs/security.md#query-patterns): near-duplicate queries and flagged
images per client, as a decision-based attack would make them."""

import httpx
import numpy as np
import torch

from service.serve.app import create_app
from service.serve.monitor import NEAR, rms_distance, thumbnail
from service.serve.quotas import client_id
from service.serve.settings import Settings
from tests.conftest import png, serving
from tests.test_batching import PNG


def _walk(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """An attack's walk: n copies of x, each with its own small noise (±4/255), as 8-bit images."""
    g = torch.Generator().manual_seed(0)
    return [((x + (torch.rand(x.shape, generator=g) - 0.5) * 8 / 255).clamp(0, 1) * 255).round() / 255 for _ in range(n)]


def test_thumbnails_keep_noisy_copies_together_and_digits_apart(digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    for d in x:
        thumbs = np.stack([thumbnail(c.numpy()) for c in _walk(d, 8)])
        assert (rms_distance(thumbs, thumbnail(d.numpy())) <= NEAR).all()
    all_digits = np.stack([thumbnail(d.numpy()) for d in x])
    distances = [float(rms_distance(all_digits[i + 1 :], all_digits[i]).min()) for i in range(len(x) - 1)]
    assert min(distances) > NEAR  # no two different digits are near-duplicates


def test_the_thumbnail_is_the_block_mean_of_the_grey_image() -> None:
    x = np.random.default_rng(0).random((3, 32, 48), dtype=np.float32)
    grey = x.mean(0).reshape(16, 2, 16, 3).mean((1, 3))  # (16, 16) block means
    assert np.array_equal(thumbnail(x), np.round(grey * 255).astype(np.uint8).reshape(-1))
    small = thumbnail(np.ones((1, 8, 8), np.float32))  # an image under 16 px: its own pixels, zero-padded
    assert (small[:64] == 255).all() and (small[64:] == 0).all()


def _counted(text: str, client: str) -> float:
    line = next((s for s in text.splitlines() if s.startswith(f'fisherguard_client_near_duplicates_total{{client="{client}"}}')), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_walk_of_near_duplicates_is_counted_for_its_client_only(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    walk = _walk(x[3], 12)
    with serving(create_app(Settings(device="cpu", api_keys="k1,k2"), bundle=mnist)) as base:
        for img in walk:
            assert (
                httpx.post(base + "/v1/detect", content=png(img), headers=PNG | {"authorization": "Bearer k1"}, timeout=30).status_code
                == 200
            )
        for img in x:
            httpx.post(base + "/v1/detect", content=png(img), headers=PNG | {"authorization": "Bearer k2"}, timeout=30)
        text = httpx.get(base + "/metrics").text
    assert _counted(text, client_id("k1", "")) == 11  # every query after the first was a near-duplicate
    assert _counted(text, client_id("k2", "")) == 0  # different digits are not
    assert 'fisherguard_client_near_duplicates_total{client="anonymous"} 0.0' in text
