"""Text normalisation lives in the torch-free runtime (one place for training and serving); see cmath_runtime.text_clean."""

from cmath_runtime.text_clean import TEXT_NORMALISATION, clean_text, decode_bytes

__all__ = ["TEXT_NORMALISATION", "clean_text", "decode_bytes"]
