"""Feature extraction and the on-disk cache."""
from prolip.features.cache import (CachedViews, CacheError, CacheStats, FeatureCache, default_cache_dir,
                                   encode_images, extract_dataset, image_key)

__all__ = ["CachedViews", "CacheError", "CacheStats", "FeatureCache", "default_cache_dir", "encode_images",
           "extract_dataset", "image_key"]
