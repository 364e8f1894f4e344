"""The pure domain core: formats, images, exports. No Dagster imports here."""

from animl_assets.core.cct import CCTFormatError, CCTValidation, load_cct, summarize_cct, validate_cct
from animl_assets.core.images import ImageCheck, ImageRequest, collect_images, verify_image
from animl_assets.core.paths import UnsafePathError, safe_relative_path
from animl_assets.core.sample import write_sample_export

__all__ = [
    "CCTFormatError", "CCTValidation", "ImageCheck", "ImageRequest", "UnsafePathError", "collect_images",
    "load_cct", "safe_relative_path", "summarize_cct", "validate_cct", "verify_image", "write_sample_export",
]
