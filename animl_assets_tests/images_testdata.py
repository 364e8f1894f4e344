"""Image bytes for tests: valid oddities and every kind of broken file."""

import io

from PIL import Image


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def rgb(width: int = 64, height: int = 48) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(rgb().transpose(Image.Transpose.ROTATE_90), exif=exif)


def corrupt_jpeg() -> bytes:
    data = bytearray(jpeg(rgb()))
    data[200:260] = b"\xff\xd9" * 30  # end-of-image markers inside the entropy-coded data
    return bytes(data)


VALID = {
    "rgb.jpg": lambda: jpeg(rgb()),
    "cmyk.jpg": lambda: jpeg(rgb().convert("CMYK")),
    "gray.jpg": lambda: jpeg(rgb().convert("L")),
    "exif.jpg": exif_rotated,
}
BROKEN = {  # file name -> (bytes, expected category)
    "zero.jpg": (lambda: b"", "non_image"),
    "text.jpg": (lambda: b"hello, not an image", "non_image"),
    "half.jpg": (lambda: jpeg(rgb())[:300], "truncated"),
    "corrupt.jpg": (corrupt_jpeg, "bad"),
}
