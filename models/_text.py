"""Offline English text for the trained bundled models: Debian's ``fortunes`` package.

``apt-get install fortunes`` puts ~2.5 MB of English quotations, jokes and definitions in
/usr/share/games/fortunes (one file per topic, entries separated by ``%`` lines). Entries are
split into train and test by a hash of their text (``is_test``), the same way for the speech
recognizer's sentences and the language model's text, so no test sentence is trained on.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
SKIP_FILES = {"art", "ascii-art", "translate-me", "perl", "debian", "linuxcookie", "knghtbrd"}  # pictures, code, IRC logs
TEST_EVERY = 20  # 1 entry in 20 is held out


def fortune_entries() -> list[str]:
    """All entries of the installed English fortune files, attribution lines (``-- Author``) dropped."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: apt-get install fortunes")
    entries = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or path.is_symlink() or path.name in SKIP_FILES:
            continue
        for raw in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln for ln in raw.splitlines() if not ln.strip().startswith("--")]
            text = " ".join(" ".join(lines).split())
            if text:
                entries.append(text)
    return entries


def is_test(entry: str) -> bool:
    return zlib.crc32(entry.encode()) % TEST_EVERY == 0


# --------------------------------------------------------------------------- speech sentences
CHARS = " 'abcdefghijklmnopqrstuvwxyz"  # CTC units 1..28; 0 is blank
UNITS = ["<blank>", *CHARS]
# Words espeak expands or spells out, so their transcript would not match the audio.
_ABBREV = re.compile(r"\b(mr|mrs|ms|dr|st|jr|sr|etc|vs|eg|ie|ok|tv|mt|ft|co|inc|ltd|no|vol)\b")
_BAD = re.compile(r"[^A-Za-z' ,.;:!?\"()-]")


def speech_sentences(entries: list[str]) -> list[tuple[str, str]]:
    """(text for espeak, transcript) pairs: sentences of 4-14 plain words, 16-90 characters.

    Refused: digits and symbols (espeak reads them as words), all-caps words (spelled out),
    common abbreviations, words with inner hyphens or quotes other than apostrophes."""
    out, seen = [], set()
    for entry in entries:
        for sent in re.split(r"(?<=[.!?])\s+", entry):
            sent = sent.strip(" \"'()-")
            if not sent or _BAD.search(sent) or re.search(r"\b[A-Z]{2,}\b", sent) or "--" in sent:
                continue
            words = re.sub(r"[,.;:!?\"()]", " ", sent.replace("-", " ")).lower().split()
            words = [w.strip("'") for w in words]
            if not 4 <= len(words) <= 14 or any(not w for w in words):
                continue
            transcript = " ".join(words)
            if not 16 <= len(transcript) <= 90 or _ABBREV.search(transcript) or transcript in seen:
                continue
            if any(c not in CHARS for c in transcript):
                continue
            seen.add(transcript)
            out.append((sent, transcript))
    return out


def encode_chars(transcript: str) -> list[int]:
    return [CHARS.index(c) + 1 for c in transcript]


def decode_units(ids) -> str:
    return "".join(UNITS[i] for i in ids if i > 0)


# --------------------------------------------------------------------------- LM words
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,!?;:]")


def lm_words(entry: str) -> list[str]:
    """Lower-cased words and sentence punctuation of one entry, then an end-of-entry token."""
    return _WORD.findall(entry.lower()) + ["<eos>"]
