"""A terminal streamer that redraws the whole canvas in place, so a person watches text denoise.

`SFDLMGenerationMixin.generate` calls `put(ids)` once with the canvas before the first generated position,
`put_draft(ids)` with the rest of the canvas after every denoising step, `put(ids)` with the final rest,
then `end()` (the protocol of transformers' `TextDiffusionStreamer`). `CanvasStreamer` prints the text with
masked positions as a placeholder and, below it, a tqdm progress meter; on a terminal each draft replaces
the previous one, elsewhere (a pipe, a log file) only the final text is printed and the progress goes to a
plain tqdm bar on stderr.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import TextIO

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

__all__ = ["CanvasStreamer", "decode_visible"]

_CLEAR_TO_END = "\033[J"


def decode_visible(tokenizer, ids: list[int], placeholder: str | None = None) -> str:
    """`ids` as text for people: special tokens dropped (padding, EOS, BOS, ...) except the unknown token,
    which stays visible (`[UNK]`); mask tokens shown as `placeholder` (default: the tokenizer's mask token)."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    hidden = set(getattr(tokenizer, "all_special_ids", ())) - {unk_id, mask_id}
    ids = [i for i in ids if i not in hidden]
    if mask_id is None or placeholder is None:
        return tokenizer.decode(ids, skip_special_tokens=False).strip()
    # Decode runs between masks so the placeholder sits where the masks are, whatever the tokenizer.
    pieces, run = [], []
    for i in ids + [None]:
        if i is None or i == mask_id:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=False).strip())
                run = []
            if i is not None:
                pieces.append(placeholder)
        else:
            run.append(i)
    return " ".join(piece for piece in pieces if piece)


class CanvasStreamer(BaseStreamer):
    """Live view of a diffusion canvas.

    Args:
        tokenizer: decodes the ids (its `mask_token`, if any, is shown as `placeholder`).
        total_steps: number of drafts expected (the `steps` of generation), for the progress meter.
        placeholder: what a masked position looks like.
        stream: where the text goes (stdout by default).
        live: redraw in place; defaults to `stream.isatty()`.
        progress: show the progress meter / bar.
        sleep: seconds to pause after each draft (to slow the animation down for a demo).
    """

    def __init__(self, tokenizer, total_steps: int | None = None, placeholder: str = "░",
                 stream: TextIO | None = None, live: bool | None = None, progress: bool = True,
                 sleep: float | None = None):
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.placeholder = placeholder
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if live is None else live
        self.progress = progress
        self.sleep = sleep
        self.prefix: torch.Tensor | None = None
        self.final: list[str] | None = None
        self.drafts = 0
        self._rows_on_screen = 0
        self._start = time.monotonic()
        self._bar = None  # created at the first draft, so an error before any step leaves no bar behind

    # ------------------------------------------------------------------ the streamer protocol
    def put(self, value: torch.Tensor) -> None:
        """First call: the fixed canvas before the first generated position. Second call: the final rest."""
        value = self._as_rows(value)
        if self.prefix is None:
            self.prefix = value
            return
        self.final = self.texts(value)
        if self.live:
            self._redraw(self.final, meter=False)

    def put_draft(self, value: torch.Tensor, **kwargs) -> None:
        """One denoising step's canvas (after the prefix): redraw it in place."""
        self.drafts += 1
        if self.progress and not self.live:
            if self._bar is None:
                self._bar = tqdm(total=self.total_steps, desc="denoising", unit="step", file=sys.stderr, leave=False)
            self._bar.update(1)
        if self.live:
            self._redraw(self.texts(self._as_rows(value)), meter=self.progress)
        if self.sleep:
            time.sleep(self.sleep)

    def end(self) -> None:
        """Finish the view: a newline on a terminal, the final text elsewhere."""
        if self._bar is not None:
            self._bar.close()
        if self.live:
            self.stream.write("\n")
        elif self.final is not None:
            self.stream.write("\n".join(self.final) + "\n")
        self.stream.flush()

    # ------------------------------------------------------------------ rendering
    def texts(self, rest: torch.Tensor) -> list[str]:
        """One string per row: the prefix and `rest` decoded, mask tokens shown as the placeholder.

        The generated part ends at its first EOS; special tokens (padding, EOS, BOS, ...) are never
        printed, but unknown tokens are, as the tokenizer's unknown token (e.g. `[UNK]`), so a word
        the tokenizer cannot represent does not silently vanish."""
        prefix = self.prefix if self.prefix is not None else rest[:, :0]
        if prefix.shape[0] != rest.shape[0]:  # one prompt, several samples
            prefix = prefix.expand(rest.shape[0], -1)
        return [self._decode(p.tolist() + self._until_eos(r.tolist())) for p, r in zip(prefix, rest)]

    def _until_eos(self, ids: list[int]) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids[:ids.index(eos)] if eos is not None and eos in ids else ids

    def _decode(self, ids: list[int]) -> str:
        return decode_visible(self.tokenizer, ids, self.placeholder)

    def _meter(self) -> str:
        width = shutil.get_terminal_size().columns
        return tqdm.format_meter(self.drafts, self.total_steps, time.monotonic() - self._start,
                                 ncols=width, prefix="denoising", unit="step")

    def _redraw(self, texts: list[str], meter: bool) -> None:
        width = max(shutil.get_terminal_size().columns, 1)
        lines = [f"[{i}] {t}" if len(texts) > 1 else t for i, t in enumerate(texts)]
        if meter:
            lines.append(self._meter())
        out = []
        if self._rows_on_screen:
            # back to the first row of the previous draft, then clear everything below
            up = self._rows_on_screen - 1
            out.append("\r" + (f"\033[{up}A" if up else "") + _CLEAR_TO_END)
        out.append("\n".join(lines))
        self.stream.write("".join(out))
        self.stream.flush()
        self._rows_on_screen = sum(max(1, math.ceil(len(line) / width)) for line in lines)

    @staticmethod
    def _as_rows(value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value)
        return value.unsqueeze(0) if value.dim() == 1 else value
