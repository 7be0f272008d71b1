"""Feature extraction and the on-disk cache: storage (unit files), locking, extraction (images → features) and the
cache in front of them."""

from prolip.features.cache import (
    CachedViews,
    CacheError,
    CacheStats,
    CenterFeatures,
    FeatureCache,
    default_cache_dir,
    extract_dataset,
    image_key,
)
from prolip.features.extraction import encode_images

__all__ = [
    "CachedViews",
    "CacheError",
    "CacheStats",
    "CenterFeatures",
    "FeatureCache",
    "default_cache_dir",
    "encode_images",
    "extract_dataset",
    "image_key",
]
