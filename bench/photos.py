"""Real photos available offline, and ImageNet-shaped data made from them.

* :func:`real_photos`: every photo the installed packages ship that loads without a download
  (scikit-image's ``skimage.data``, matplotlib's sample data), as RGB uint8 arrays.
* :func:`imagenet_like`: one ImageNet-typical training JPEG from a photo: a random crop, a
  short side of 250-500 px, a random flip and a mild colour change, so every file differs.
* :func:`write_imagenet_tree`: an ImageNet-shaped folder tree (``<root>/<synset>/<name>.JPEG``,
  synset folders in sorted order, as ImageNet is laid out), plus a few odd files that real
  datasets hold: a 16-bit PNG, an EXIF-rotated JPEG, a CMYK JPEG, a palette PNG with transparency,
  a grayscale JPEG, and (optionally) a truncated JPEG.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

# skimage.data photos that ship with the package (others need a download)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "cat", "immunohistochemistry",
                  "retina", "colorwheel", "hubble_deep_field", "camera", "coins", "moon", "page", "text",
                  "clock", "horse", "grass", "gravel", "brick")


def real_photos(min_side: int = 200, exclude: Sequence[str] = ()) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) of every offline photo at least ``min_side`` px on its short side."""
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        if name in exclude:
            continue
        fn = getattr(skimage.data, "stereo_motorcycle" if name == "motorcycle" else name, None)
        try:
            img = fn() if fn is not None else None
        except Exception:  # needs a download (pooch) on this install
            continue
        if isinstance(img, tuple):
            img = img[0]
        if img is None or img.ndim not in (2, 3):
            continue
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-9))).astype(np.uint8)
        rgb = np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]
        if min(rgb.shape[:2]) >= min_side:
            out.append((name, np.ascontiguousarray(rgb)))
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if sample.exists() and "grace_hopper" not in exclude:
        out.append(("grace_hopper", np.asarray(Image.open(sample).convert("RGB"))))
    if not out:
        raise RuntimeError("no offline photos found (scikit-image / matplotlib sample data)")
    return out


def imagenet_like(photo: np.ndarray, rng: np.random.Generator, short_side: tuple[int, int] = (250, 500)
                  ) -> Image.Image:
    """An ImageNet-typical picture from ``photo``: random crop (30-100 % of the area, aspect 3/4-4/3,
    landscape or portrait), short side in ``short_side``, random flip, mild brightness/contrast."""
    h, w = photo.shape[:2]
    area = h * w * rng.uniform(0.3, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = min(h, int(round(np.sqrt(area / aspect)))), min(w, int(round(np.sqrt(area * aspect))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    side = int(rng.integers(short_side[0], short_side[1] + 1))
    scale = side / min(ch, cw)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def write_imagenet_tree(root: str | os.PathLike, classes: Sequence[str], per_class: int, seed: int = 0,
                        odd_files: bool = True, corrupt: bool = False,
                        photos: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Write ``root/<class>/<class>_<i>.JPEG`` (q 90) for every class, in sorted class order.

    Returns ``{"files": n, "odd": {kind: path}}``; odd files go into the first classes' folders
    (``corrupt`` adds a truncated JPEG, for ``make_shards --skip-bad``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = photos or real_photos()
    n = 0
    for c, name in enumerate(sorted(classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _, photo = photos[int(rng.integers(len(photos)))]
            (folder / f"{name}_{i}.JPEG").write_bytes(jpeg_bytes(imagenet_like(photo, rng)))
            n += 1
    odd: dict[str, str] = {}
    if odd_files:
        names = sorted(classes)
        pic = lambda: imagenet_like(photos[int(rng.integers(len(photos)))][1], rng)  # noqa: E731
        gray16 = (np.asarray(pic().convert("L"), dtype=np.uint16) * 257)
        kinds = {
            "png16": lambda p: Image.fromarray(gray16).save(p, format="PNG"),
            "exif_rotated": lambda p: _exif_rotated(pic(), p),
            "cmyk": lambda p: pic().convert("CMYK").save(p, format="JPEG", quality=90),
            "palette_alpha": lambda p: pic().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            .save(p, format="PNG", transparency=0),
            "grayscale": lambda p: pic().convert("L").save(p, format="JPEG", quality=90),
        }
        for j, (kind, save) in enumerate(kinds.items()):
            ext = "png" if kind in ("png16", "palette_alpha") else "JPEG"
            path = root / names[j % len(names)] / f"odd_{kind}.{ext}"
            save(path)
            odd[kind] = str(path)
        n += len(kinds)
        if corrupt:
            path = root / names[-1] / "odd_truncated.JPEG"
            path.write_bytes(jpeg_bytes(pic())[:2000])
            odd["truncated"] = str(path)
    return {"files": n, "odd": odd}


def _exif_rotated(upright: Image.Image, path: Path) -> None:
    """Save ``upright`` as a camera would: the sensor image turned, plus orientation tag 6."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=90, exif=exif.tobytes())
