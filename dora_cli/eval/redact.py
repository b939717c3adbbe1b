"""Keep a secret (the judge's API key) out of text that came from the network, before it is printed or stored.

    clean = Redactor(api_key)
    text = clean(text_from_the_network)   # every form of the key, whole or in part, becomes ***

What counts as the key, in the text as received:

- the key itself, and its URL-encoded (`quote`, `quote_plus`) and JSON-escaped forms;
- its base64 forms (standard and URL-safe alphabets) at each of the three byte alignments it can have
  inside a longer encoded text, the characters that mix key bits with neighbouring bytes included;
- any run of FRAGMENT or more consecutive characters of one of those forms: a key an endpoint cut short,
  split over a line break, or echoed in part. What may remain is under FRAGMENT characters at each end
  of such a run, too few to be of use.

Redact first, cut afterwards: text is redacted whole and only then shortened for an error line, so that
no cut can leave part of a key that a later match would have found.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse

FRAGMENT = 8
MASK = "***"
_B64_NEIGHBOUR = re.compile(r"[A-Za-z0-9+/_=-]")


def _base64_cores(raw: bytes) -> list[str]:
    """The base64 characters that depend on `raw` alone, at byte offsets 0, 1 and 2 of an encoded text."""
    cores = []
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            text = encode(b"\0" * offset + raw).decode("ascii")
            start = -(-8 * offset // 6)  # characters that hold bits of the bytes before the key
            cores.append(text[start : len(text) - 4])  # the last group may hold bits of the bytes after it
    return cores


def public_url(url: str) -> str:
    """The URL without user:password@, query and fragment (where keys also travel), for messages and files."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment=""))


class Redactor:
    """A function text -> text with every form of `secret` masked; the identity without a secret."""

    def __init__(self, secret: str | None):
        self.whole: list[str] = []
        self.fragments: dict[str, bool] = {}  # fragment -> whether it is base64 (extend over neighbours)
        if not secret:
            return
        plain = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret), json.dumps(secret)[1:-1]}
        encoded = set(_base64_cores(secret.encode("utf-8")))
        self.whole = sorted(plain, key=len, reverse=True)
        for forms, is_base64 in ((plain, False), (encoded, True)):
            for form in forms:
                for i in range(len(form) - FRAGMENT + 1):
                    self.fragments.setdefault(form[i : i + FRAGMENT], is_base64)

    def __call__(self, text: str) -> str:
        if not self.whole:
            return text
        for form in self.whole:
            text = text.replace(form, MASK)
        spans = self._spans(text)
        out, last = [], 0
        for start, end in spans:
            out += [text[last:start], MASK]
            last = end
        return "".join(out) + text[last:]

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Merged [start, end) ranges covered by fragments (base64 ones widened over their neighbours)."""
        spans: list[list[int]] = []
        for i in range(len(text) - FRAGMENT + 1):
            is_base64 = self.fragments.get(text[i : i + FRAGMENT])
            if is_base64 is None:
                continue
            start, end = i, i + FRAGMENT
            if is_base64:
                while start > 0 and i - start < 4 and _B64_NEIGHBOUR.match(text[start - 1]):
                    start -= 1
                while end < len(text) and end - i - FRAGMENT < 4 and _B64_NEIGHBOUR.match(text[end]):
                    end += 1
            if spans and start <= spans[-1][1]:
                spans[-1] = [min(spans[-1][0], start), max(spans[-1][1], end)]
            else:
                spans.append([start, end])
        return [(s, e) for s, e in spans]
