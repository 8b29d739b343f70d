"""Token ids -> text deltas with stop strings: shared by the local engine and the router.

Text that could still turn out to be the start of a stop string is held back, so a
client never receives characters that a later token reveals to be part of a stop.
"""

from __future__ import annotations

from engine.tokenizer import IncrementalDetokenizer, TextTokenizer


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (),
                 skip_ids: tuple[int, ...] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip_ids = set(skip_ids)  # e.g. the EOS token that ended the request
        self.emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self.detok.text[: self.emitted]

    def push(self, token_ids: list[int], finished: bool) -> str:
        """Feed new tokens; returns the text delta to send. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        before = len(self.detok.text)
        for t in token_ids:
            if not (finished and t in self.skip_ids):
                self.detok.push(t)
        full = self.detok.text
        if self.stop:
            start = max(0, before - self.hold)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(min(hits))
        if finished:
            return self._emit(len(full))
        return self._emit(max(self.emitted, len(full) - self.hold))

    def _emit(self, upto: int) -> str:
        delta = self.detok.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta
