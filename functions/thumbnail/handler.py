"""Resize each uploaded image to a thumbnail and a medium size (Pillow).

The event is S3's ObjectCreated:Put notification: `s3.object.key` is the
path relative to the watched dir, URL-encoded as S3 does, and
`faasd.path` is the file itself. Outputs keep the image's aspect ratio and
are written next to the watched dir (OUTPUT_DIR), never inside it, so they
do not trigger the function again.
"""

import os
from pathlib import Path
from urllib.parse import unquote_plus

from PIL import Image, ImageOps

SIZES = {
    "thumbnail": int(os.environ.get("THUMBNAIL_SIZE", "200")),
    "medium": int(os.environ.get("MEDIUM_SIZE", "800")),
}
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def output_root(source: Path, key: str) -> Path:
    watched = source.parents[len(Path(key).parts) - 1]
    configured = Path(os.environ.get("OUTPUT_DIR", "../thumbnails"))
    return configured if configured.is_absolute() else (watched / configured).resolve()


def handler(event, context):
    outputs = []
    for record in event["Records"]:
        key = unquote_plus(record["s3"]["object"]["key"])
        source = Path(record["faasd"]["path"])
        target_dir = output_root(source, key) / Path(key).parent
        target_dir.mkdir(parents=True, exist_ok=True)
        image_format = FORMATS.get(source.suffix.lower(), "PNG")
        with Image.open(source) as original:
            image = ImageOps.exif_transpose(original)  # phones store rotation in EXIF
            if image_format == "JPEG" and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            for label, side in SIZES.items():
                resized = image.copy()
                resized.thumbnail((side, side), Image.Resampling.LANCZOS)
                target = target_dir / f"{source.stem}-{label}{source.suffix}"
                partial = target.with_name(f".{target.name}.partial")
                resized.save(partial, format=image_format)
                partial.replace(target)  # readers never see a half-written image
                outputs.append({"size": label, "path": str(target),
                                "width": resized.width, "height": resized.height})
        print(f"resized {record['s3']['bucket']['name']}/{key}: "
              + ", ".join(f"{o['size']} {o['width']}x{o['height']}" for o in outputs[-len(SIZES):]))
    return {"outputs": outputs}
