"""Image bytes -> 8-bit RGB PIL image: the one decode rule for the caching job and the student.

Both sides must see the same pixels, so decoding is part of the augmentation plan (its
fingerprint covers :func:`canonical_decodes`). What it does beyond ``Image.open(...).convert("RGB")``,
which silently gets these wrong:

* **EXIF orientation** is applied (``exif_transpose=True``, the default; a phone photo tagged
  "rotate 90°" comes out upright). Switch it off to reproduce loaders that ignore EXIF.
* **16-bit** images (``I;16*``, ``I``) are scaled to 8 bits (``round(v / 257)``); Pillow's
  ``convert("RGB")`` clips them, so a 16-bit PNG would decode to nearly all white.
* **Alpha** (``RGBA``, ``LA``, ``PA``, palette with transparency) is composited over white, the
  usual background of cut-out product photos, instead of exposing whatever colour the
  transparent pixels happen to hold.
* **CMYK** (incl. Adobe's inverted CMYK JPEGs), palette, grayscale, ``YCbCr`` and ``LAB`` images
  are converted to RGB by Pillow.

Modes with no defined 8-bit meaning (float ``F``) are refused with :class:`DecodeError`.

**Pixel limit.** Images come from crawls and other people's shards: an image larger than
``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, 64 MP) is refused with
:class:`ImageTooLargeError` from its header, before any pixel is decoded (``Image.open`` reads
only the header; ``load`` allocates the pixels). 64 MP holds every camera photo up to 61 MP
sensors and any ImageNet / Open Images picture, while a decode stays under ~200 MB (3 bytes a
pixel) in each of the many workers that decode at once; PIL's own guard warns at 89 MP and
refuses only at 179 MP (a 120 MP JPEG took ``make_shards`` to 750 MB RSS). The caching job
and student take it from ``aug.max_pixels``, ``make_shards`` from ``--max-pixels``; a refused
image is a bad sample like a corrupt one (``--skip-bad`` records it).

**Samples and shards.** :func:`decode_image` decodes a shard's sample and names shard and key
when it cannot (a :class:`~pipeline.errors.SampleError`). :func:`encode_for_shard` is what
``make_shards`` stores: it checks that the bytes decode by this rule, keeps original
JPEG/PNG/WebP bytes (the ImageNet convention) and re-encodes other formats as PNG (lossless).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import SampleError
from pipeline.shards import RawSample

_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEFAULT_MAX_PIXELS = 64_000_000  # width x height; see "Pixel limit" above
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


class DecodeError(ValueError):
    """The bytes are not a decodable image, or its pixel format has no 8-bit RGB meaning."""


class ImageTooLargeError(DecodeError):
    """The image header declares more than ``max_pixels`` pixels (refused before decoding)."""


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Raise ImageTooLargeError if the opened (not yet loaded) ``image`` exceeds ``max_pixels``."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{image.format or 'image'} of {width}x{height} = {width * height / 1e6:.1f} MP "
                                 f"exceeds the pixel limit of {max_pixels / 1e6:g} MP (aug.max_pixels / "
                                 f"make_shards --max-pixels); refused before decoding")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a loaded PIL image (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        gray = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        raise DecodeError("float ('F') images have no defined 8-bit range")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info) \
            or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes fully into an 8-bit RGB PIL image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, TIFF, ...).
        exif_transpose: apply the EXIF orientation tag.
        max_pixels: refuse larger images from their header, before decoding.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (a DecodeError).
        DecodeError: unreadable bytes or an unsupported pixel format (the caller names the sample).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im, max_pixels)
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except DecodeError:
        raise
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise DecodeError(f"{type(exn).__name__}: {exn}") from exn


def decode_image(raw: RawSample, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a sample's bytes into 8-bit RGB (:func:`decode`); SampleError naming
    shard/key, also for a sample the manifest lists as bad or one over ``max_pixels``."""
    if raw.error is not None:
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): listed as bad "
                          f"in the manifest: {raw.error}", shard=raw.shard, key=raw.key)
    try:
        return decode(raw.data, exif_transpose, max_pixels)
    except DecodeError as exn:
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): "
                          f"cannot decode {raw.ext}: {exn}", shard=raw.shard, key=raw.key) from exn


def encode_for_shard(data: bytes, origin: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """Validate encoded image bytes by decoding them the plan's way; return (bytes, ext).

    JPEG, PNG and WebP bytes are kept as they are (the ImageNet convention); any other format
    Pillow reads (TIFF, BMP, PPM, GIF, ...) is re-encoded as lossless PNG in its own mode where
    PNG has one (16-bit gray, alpha, palette stay), with the EXIF orientation applied, because
    the PNG loses the tag. Raises SampleError naming ``origin`` if the image cannot be decoded
    or has more than ``max_pixels`` pixels (checked from its header, before decoding).
    """
    try:
        decode(data, max_pixels=max_pixels)  # the same rule the replay applies: what passes here decodes there
        with Image.open(io.BytesIO(data)) as im:
            ext = _KEPT_FORMATS.get(im.format)
            if ext is not None:
                return data, ext
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode not in _PNG_MODES:
                im = to_rgb(im)
            out = io.BytesIO()
            im.save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception as exn:
        raise SampleError(f"{origin}: cannot decode image: {exn}", path=origin) from exn


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image (used for array sources such as Fashion-MNIST)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- fingerprint inputs

def _canonical_sources() -> list[bytes]:
    """Small encoded images, built with integer arithmetic, one per decoding rule above."""
    y, x = np.mgrid[0:12, 0:16]
    rgb = np.stack([x * 15, y * 20, (x + y) * 9], axis=-1).astype(np.uint8)
    out = []

    def save(image: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())

    base = Image.fromarray(rgb, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save(base, "JPEG", quality=90, exif=exif.tobytes())
    save(Image.fromarray((x * 4000 + y * 300).astype(np.uint16)), "PNG")   # 16-bit gray
    rgba = np.concatenate([rgb, ((x * 16) % 256).astype(np.uint8)[..., None]], axis=-1)
    save(Image.fromarray(rgba, "RGBA"), "PNG")
    save(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=3)
    save(base.convert("CMYK"), "JPEG", quality=90)
    return out


def canonical_decodes(exif_transpose: bool = True) -> list[np.ndarray]:
    """Decoded pixels of :func:`_canonical_sources` (the plan fingerprint hashes them)."""
    return [np.asarray(decode(data, exif_transpose)) for data in _canonical_sources()]
