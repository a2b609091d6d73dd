"""Decoding image bytes into the (C, H, W) float tensor a bundle's model expects (docs/bundles.md#input)."""

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.preprocess import Input, fit


class ImageError(ValueError):
    """An image that cannot be used, with a machine-readable code: `bad_image`, `payload_too_large`
    or `unsupported_media_type` (the HTTP layer maps codes to statuses)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def bad_image(message: str) -> ImageError:
    return ImageError("bad_image", message)


FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"}


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header only (no pixel is decoded yet), refused when it is not an accepted format
    or claims more than max_pixels pixels. Pillow's own decompression-bomb check stays on."""
    if not data:
        raise bad_image("the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("payload_too_large", f"image refused before decoding ({e}); the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise bad_image(f"cannot decode the image ({len(data)} bytes): {e}") from None
    if img.format not in FORMATS:
        raise ImageError("unsupported_media_type", f"image format {img.format!r} is not accepted; use one of {sorted(FORMATS)}")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("payload_too_large", f"image is {w}x{h} = {w * h} pixels, the limit is {max_pixels}")
    return img


def _to_mode(img: Image.Image, channels: int, background: int) -> Image.Image:
    """Grayscale or RGB, transparency composited on the background grey level."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / (257.0 if arr.max() > 255 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        base = Image.new("RGBA", img.size, (background,) * 3 + (255,))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def pixels(img: Image.Image) -> int:
    """Width × height as the header claims it."""
    return int(img.size[0]) * int(img.size[1])


def decode(data: bytes, spec: Input, max_pixels: int) -> torch.Tensor:
    """Bytes -> the card's (channels, height, width) float32 in [0, 1] (service.core.preprocess)."""
    return to_tensor(open_image(data, max_pixels), spec)


def to_tensor(img: Image.Image, spec: Input) -> torch.Tensor:
    """An opened image decoded, converted and brought to the card's input. -> (channels, height, width)."""
    try:
        img.seek(0)
        img = _to_mode(img, spec.channels, spec.background)
    except (OSError, ValueError, SyntaxError) as e:
        raise bad_image(f"cannot decode the image: {e}") from None
    try:
        img = fit(img, spec)
    except ValueError as e:  # another size under resize: "reject"
        raise bad_image(str(e)) from None
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    t = torch.from_numpy(arr.reshape(spec.height, spec.width, spec.channels)).permute(2, 0, 1).contiguous()
    if not torch.isfinite(t).all():
        raise bad_image("preprocessing produced non-finite values")
    return t


def encode_png(x: torch.Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes, 8-bit."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "PNG")
    return buf.getvalue()


def from_array(values: np.ndarray | list[bytes], datatype: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A tensor of pixels as the Open Inference Protocol carries them (docs/oip.md): FP32 in [0, 1] or
    UINT8, (N, C, H, W) in the card's layout -> (N, C, H, W) float32 in [0, 1]; bad_image otherwise.
    The service's /v2 and the MLServer runtime both convert through it."""
    if datatype not in ("FP32", "UINT8") or not isinstance(values, np.ndarray):
        raise bad_image(f"datatype {datatype} is not FP32 or UINT8")
    if values.ndim != 4 or tuple(values.shape[1:]) != shape or values.shape[0] == 0:
        raise bad_image(f"shape {list(values.shape)} is not [N, {', '.join(map(str, shape))}] with N >= 1")
    x = torch.from_numpy(np.array(values, dtype=np.float32))
    if datatype == "UINT8":
        return x / 255
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise bad_image(f"FP32 pixels must be finite and in [0, 1] (min {x.min():.4g}, max {x.max():.4g})")
    return x
