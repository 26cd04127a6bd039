"""Text normalisation applied to every text before it is embedded, in training (cmath-prepare) and at run time.

Conversation CSVs in the wild carry encoding damage: MELD's original release has C1 control characters
where Windows-1252 punctuation was meant ("\\x92" for a right single quote, "\\x85" for an ellipsis) and
re-exports of it show UTF-8 read as cp1252 ("â€™"). `clean_text` repairs these without ever failing:

1. mojibake: when a string holds a likely lead character (Â..ô) and its cp1252/latin-1 bytes decode as
   strict UTF-8 into plausible characters (Latin, Greek, Cyrillic, punctuation, currency, symbols, emoji),
   the decoded string is used ("â€™" -> "’", "Ã©" -> "é", "ðŸ˜‚" -> "😂"); otherwise it is kept;
2. C1 controls U+0080..U+009F become the cp1252 character of the same byte ("\\x92" -> "’"); the five
   bytes cp1252 leaves undefined are dropped;
3. Unicode NFC;
4. other control characters are dropped, any run of whitespace becomes one space, ends are stripped.

A later runtime that embeds live text must apply the same function (it is pure Python, no torch),
see `TEXT_NORMALISATION` which is recorded in the features' meta.
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
    s = "".join(
        ch for ch in s if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf") or ch == "\u200d"
    )
    return _SPACE.sub(" ", s).strip()


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """File bytes as text and the encoding used: UTF-8 (BOM stripped) if valid, else cp1252 with latin-1 fallback."""
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return "".join(_byte_cp1252(b) for b in raw), "cp1252"


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
