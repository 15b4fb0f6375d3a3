"""Resize each uploaded image to a thumbnail and a medium size (Pillow).

The event is S3's ObjectCreated:Put notification: `s3.object.key` is the
path in the bucket (the watched dir), URL-encoded as S3 does, and
`faasd.path` is the file itself. Outputs keep the image's aspect ratio and
go under OUTPUT_PREFIX in the same bucket, which the trigger's patterns do
not match.
"""

import os
from pathlib import Path
from urllib.parse import unquote_plus

from PIL import Image, ImageOps

INPUT_PREFIX = os.environ.get("INPUT_PREFIX", "images/")
OUTPUT_PREFIX = os.environ.get("OUTPUT_PREFIX", "thumbnails/")
SIZES = {
    "thumbnail": int(os.environ.get("THUMBNAIL_SIZE", "200")),
    "medium": int(os.environ.get("MEDIUM_SIZE", "800")),
}
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def handler(event, context):
    outputs = []
    for record in event["Records"]:
        key = unquote_plus(record["s3"]["object"]["key"])
        source = Path(record["faasd"]["path"])
        bucket_root = source.parents[len(Path(key).parts) - 1]
        relative = Path(key[len(INPUT_PREFIX):] if key.startswith(INPUT_PREFIX) else key)
        target_dir = bucket_root / OUTPUT_PREFIX / relative.parent
        target_dir.mkdir(parents=True, exist_ok=True)
        image_format = FORMATS.get(source.suffix.lower(), "PNG")
        made = []
        with Image.open(source) as original:
            image = ImageOps.exif_transpose(original)  # phones store the rotation in EXIF
            if image_format == "JPEG" and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            for label, side in SIZES.items():
                resized = image.copy()
                resized.thumbnail((side, side), Image.Resampling.LANCZOS)
                target = target_dir / f"{relative.stem}-{label}{source.suffix}"
                partial = target.with_name(f".{target.name}.partial")
                resized.save(partial, format=image_format)
                partial.replace(target)  # readers never see a half-written image
                made.append({"size": label, "path": str(target),
                             "width": resized.width, "height": resized.height})
        print(f"resized {record['s3']['bucket']['name']}/{key}: "
              + ", ".join(f"{m['size']} {m['width']}x{m['height']}" for m in made))
        outputs += made
    return {"outputs": outputs}
