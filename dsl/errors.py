"""Diagnostics: `file:line:col: message`, the source line and a caret under the span."""

from __future__ import annotations

from dataclasses import dataclass

from .nodes import NO_SPAN, Span


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    source: str | None = None  # the text of span.file, for the quoted line
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        if self.span is None or self.span == NO_SPAN or self.span.line <= 0:
            out = f"attnc: {self.message}"
        else:
            out = f"{self.span.file}:{self.span.line}:{self.span.col}: {self.message}"
            quoted = _quote(self.span, self.source)
            if quoted:
                out += "\n" + quoted
        for note in self.notes:
            out += f"\n    note: {note}"
        return out


# Text of every file parsed in this process, so a diagnostic raised long after parsing (for
# example while evaluating an elastic argument) can still quote its line.
_SOURCES: dict[str, str] = {}


def register_source(file: str, text: str) -> None:
    _SOURCES[file] = text


def _quote(span: Span, source: str | None) -> str:
    # An empty text (an empty --arg value) is still the text to quote, not the file's.
    source = span.text if span.text is not None else source
    if source is None:
        source = _SOURCES.get(span.file)
    if not source:
        return ""
    # Lines as the lexer counts them: by "\n" only (splitlines also breaks at \f, \r, ...).
    lines = source.split("\n")
    if not 1 <= span.line <= len(lines):
        # An error at the end of a file that ends with a newline points past the last line.
        return ""
    text = lines[span.line - 1]
    width = 1
    if span.end_line == span.line and span.end_col > span.col:
        width = span.end_col - span.col
    width = max(1, min(width, len(text) - span.col + 2))
    # Keep tabs in the prefix so the caret lines up however the terminal renders them.
    prefix = "".join(c if c == "\t" else " " for c in text[: span.col - 1])
    return f"    {text}\n    {prefix}^{'~' * (width - 1)}"


class AttncError(Exception):
    """A user-facing error: one or more diagnostics, printed without a traceback by the CLI."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


def error(message: str, span: Span | None = None, source: str | None = None) -> AttncError:
    return AttncError(Diagnostic(message, span, source))
