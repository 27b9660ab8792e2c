"""Class labels and names as stored: Unicode NFC, trimmed, visible, one line, and never the
reserved word "unknown" (in any letter case, compatibility form or look-alike letters)."""

from __future__ import annotations

import unicodedata

from fewshot.service.errors import RequestError

UNKNOWN = "unknown"  # the label of a rejected image
MAX_LABEL_CHARS = 200

# Characters that render as nothing or as blank space but are letters or symbols to Unicode (so
# neither strip() nor the control/format categories catch them): Hangul fillers, the blank Braille
# pattern, the combining grapheme joiner, Khmer inherent vowels, Mongolian and other variation
# selectors, the object replacement character.
_BLANK_LOOKING = frozenset([0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x17B4, 0x17B5, 0xFFFC,
                            *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])
# Letters that look like those of "unknown" (a small skeleton map in the spirit of Unicode's
# confusables.txt; fullwidth and mathematical forms are already folded by NFKC).
_LOOKALIKE = str.maketrans({
    "\u043e": "o", "\u03bf": "o", "\u1d0f": "o", "\u2c9f": "o", "\u0585": "o", "\u1040": "o", "0": "o",
    "\u043a": "k", "\u03ba": "k", "\u1d0b": "k", "\u0138": "k", "\u049d": "k",
    "\u0578": "n", "\u057c": "n", "\u0274": "n", "\u03bd": "n", "\u043f": "n", "\u03b7": "n",
    "\u03c9": "w", "\u0461": "w", "\u051d": "w", "\u1d21": "w", "\u026f": "w",
    "\u03c5": "u", "\u057d": "u", "\u1d1c": "u", "\u03bc": "u", "\u028b": "u",
})


def _skeleton(text: str) -> str:
    """What `text` looks like: compatibility forms folded, marks dropped, case folded, look-alike
    letters mapped to the Latin ones."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.category(ch).startswith("M"))
    return bare.casefold().translate(_LOOKALIKE)


def normalise_text(value: object, what: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Unicode NFC, trimmed; refuses empty, over-long, control, invisible, blank-looking and
    line-separator text, and text that starts with a combining mark (naming the fix)."""
    if not isinstance(value, str):
        raise RequestError(f"{what} must be text, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise RequestError(f"{what} is empty; give 1 to {max_chars} characters")
    if len(text) > max_chars:
        raise RequestError(f"{what} has {len(text):,} characters; give at most {max_chars}")
    shown = text[:40]
    if "\ufffd" in text:
        raise RequestError(f"{what} {shown!r} contains U+FFFD, the mark of text that was not valid UTF-8; send "
                          "the text as UTF-8")
    bad = sorted({f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")})
    if bad:  # control, format (zero-width, bidi overrides), surrogate, private-use, unassigned
        raise RequestError(f"{what} {shown!r} contains control or invisible characters ({', '.join(bad[:5])}); "
                          "remove them")
    seps = sorted({f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) in ("Zl", "Zp")})
    if seps:
        raise RequestError(f"{what} {shown!r} contains line or paragraph separators ({', '.join(seps)}); "
                          "give one line of text")
    blank = sorted({f"U+{ord(ch):04X}" for ch in text if ord(ch) in _BLANK_LOOKING})
    if blank:
        raise RequestError(f"{what} {shown!r} contains characters that look blank ({', '.join(blank[:5])}); "
                          "use visible characters")
    lone = [i for i, ch in enumerate(text) if unicodedata.category(ch).startswith("M")
            and (i == 0 or text[i - 1].isspace())]
    if lone:
        ch = text[lone[0]]
        raise RequestError(f"{what} {shown!r} has a combining mark (U+{ord(ch):04X}) with no letter before it, at "
                          f"character {lone[0] + 1}; put it after the letter it belongs to, or remove it")
    return text


def check_label(label: object) -> str:
    """A class label as stored: NFC, trimmed, not the reserved word "unknown" in any letter case,
    compatibility form or look-alike letters (Cyrillic o, Greek omicron, ...)."""
    text = normalise_text(label, "class label")
    if _skeleton(text) == UNKNOWN:
        same = unicodedata.normalize("NFKC", text).casefold() == UNKNOWN
        raise RequestError(f"class label {text!r} " + ("is" if same else "looks like the word 'unknown', which is")
                          + " reserved for rejected images; choose another label")
    return text
