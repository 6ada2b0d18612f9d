"""A1111's infotext (the `parameters` text of its images): prompt lines, `Negative prompt:` lines and one
`Key: value, ...` line, parsed in one linear pass. Read by the CLI's --from-image and the server's png-info."""

from __future__ import annotations

import json


class KeyValueLine:
    """The items of A1111's `Key: value, Key: "quoted, value"` line, read left to right in one pass.

    A1111's own regex backtracks quadratically on long lines without that shape (80,000 characters took
    33 s). Here every character is examined at most twice; `steps` counts the examinations (tests pin it
    linear). A quoted value is a JSON string; an unterminated one takes the rest of the line.
    """

    def __init__(self, line: str):
        self.line = line
        self.steps = 0
        self.items: list[tuple[str, str]] = []
        self._parse()

    def _until(self, i: int, stops: str) -> int:
        """The first index at or after i holding one of `stops`, or len(line)."""
        line, n = self.line, len(self.line)
        while i < n and line[i] not in stops:
            i += 1
            self.steps += 1
        return i

    def _spaces(self, i: int) -> int:
        line, n = self.line, len(self.line)
        while i < n and line[i] in " \t":
            i += 1
            self.steps += 1
        return i

    def _closing_quote(self, i: int) -> int:
        """The index of the quote closing a string opened at i, or len(line)."""
        line, n = self.line, len(self.line)
        i += 1
        while i < n and line[i] != '"':
            i += 2 if line[i] == "\\" else 1
            self.steps += 1
        return min(i, n)

    def _parse(self) -> None:
        line, n, i = self.line, len(self.line), 0
        while i < n:
            colon = self._until(i, ",:")
            if colon == n:
                return
            if line[colon] == ",":  # an item without a key
                i = colon + 1
                continue
            key = line[i:colon].strip()
            start = self._spaces(colon + 1)
            value = None
            if start < n and line[start] == '"':
                close = self._closing_quote(start)
                if close == n:  # unterminated: the rest of the line
                    self.items.append((key, line[start:].strip()))
                    return
                after = self._spaces(close + 1)
                if after == n or line[after] == ",":
                    try:
                        value = json.loads(line[start : close + 1])
                    except ValueError:
                        value = line[start + 1 : close]
                    end = after
                else:  # text after the closing quote: a plain value up to the next comma
                    end = self._until(after, ",")
            else:
                end = self._until(start, ",")
            self.items.append((key, (line[start:end] if value is None else value).strip()))
            i = end + 1


def split_infotext(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(prompt lines as written, negative prompt stripped, the `Key: value` items): the last line counts as the
    items line only when it holds at least three keys, as A1111 reads it."""
    lines = text.strip().split("\n")
    items = KeyValueLine(lines[-1]).items if lines else []
    if len([k for k, _ in items if k]) >= 3:
        lines.pop()
    else:
        items = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative).strip(), items


def infotext_parameters(text: str) -> dict:
    """The infotext as A1111's parse_generation_parameters returns it (modules/infotext_utils.py): "Prompt",
    "Negative prompt", every `Key: value` item as a string, and "Size-1"/"Size-2" for "Size"."""
    prompt, negative, items = split_infotext(text)
    out: dict = {"Prompt": prompt.strip(), "Negative prompt": negative}
    for key, value in items:
        if key:
            out[key] = value
    width, _, height = str(out.get("Size", "")).partition("x")
    if width and height:
        out["Size-1"], out["Size-2"] = width, height
    return out
