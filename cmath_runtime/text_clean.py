"""Text normalisation for live text, identical to cmath_train.prepare.text_clean (which imports torch via its package).

A copy of `clean_text` (cmath-clean-text-v1) so the torch-free runtime embeds text exactly as cmath-prepare
did before training; tests/test_text_encoder.py checks both give the same strings on MELD and edge cases.
"""

from __future__ import annotations

import re
import unicodedata

TEXT_NORMALISATION = "cmath-clean-text-v1: mojibake repair (cp1252/latin-1 -> utf-8), C1 controls via cp1252, NFC, drop controls, collapse whitespace, strip"

_MOJIBAKE_LEAD = re.compile("[\u00c2-\u00f4]")
_PLAUSIBLE = ((0x00A0, 0x024F), (0x0370, 0x04FF), (0x2000, 0x214F), (0x2190, 0x2BFF), (0x1F000, 0x1FAFF))
_C1 = re.compile("[\u0080-\u009f]")
_SPACE = re.compile(r"\s+")


def clean_text(s: str) -> str:
    """The normalised form of one cell; never raises on odd characters."""
    if _MOJIBAKE_LEAD.search(s):
        s = _repair_mojibake(s)
    if _C1.search(s):
        s = _C1.sub(_c1_to_cp1252, s)
    s = unicodedata.normalize("NFC", s)
    s = "".join(ch for ch in s if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf") or ch == "\u200d")
    return _SPACE.sub(" ", s).strip()


def _repair_mojibake(s: str) -> str:
    raw = _single_bytes(s)
    if raw is None:
        return s
    try:
        fixed = raw.decode("utf-8")
    except UnicodeDecodeError:
        return s
    return fixed if all(ord(ch) < 0x80 or _plausible(ch) for ch in fixed) else s


def _plausible(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _PLAUSIBLE)


def _single_bytes(s: str) -> bytes | None:
    """cp1252 bytes of `s`, latin-1 for characters cp1252 lacks; None if a character has no single byte."""
    out = bytearray()
    for ch in s:
        try:
            out += ch.encode("cp1252")
        except UnicodeEncodeError:
            if ord(ch) > 0xFF:
                return None
            out.append(ord(ch))
    return bytes(out)


def _c1_to_cp1252(m: re.Match[str]) -> str:
    return _byte_cp1252(ord(m.group()), undefined="")


def _byte_cp1252(b: int, undefined: str | None = None) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b) if undefined is None else undefined
