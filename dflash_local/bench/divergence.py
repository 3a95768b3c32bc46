"""Telling a greedy divergence that is rounding from one that is a bug.

Where a pass of several tokens rounds differently from one-token passes (llama.cpp's CUDA kernels; ggml's CPU flash
attention with several threads past 256 tokens), DFlash's greedy text can leave the target alone's at a near-tie of
the target's two best tokens. A divergence counts as rounding when the target alone's logits at that position, as it
computed them (one token at a time), put its token and DFlash's closer together than the largest difference measured
between those one-token logits and a pass of `width` tokens over the same positions; anything else is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dflash_local.target import Target


@dataclass
class Divergence:
    gap: float | None  # the target alone's logit of its own token minus that of DFlash's token there
    bound: float | None  # the largest |logit difference| between the batch and the one-token passes, same positions
    batch_picks_dflash: bool | None  # whether the batch pass's argmax there is DFlash's token
    rounding: bool


def classify(tg: Target, prompt: list[int], expected: list[int], got: list[int], index: int, width: int) -> Divergence:
    """expected: the target alone's greedy tokens after prompt; got: DFlash's, first different at index. tg: a context
    of the target alone (its cache is cleared). A text that ends at index ended on an end-of-generation token, which
    the texts leave out: the target alone's is its own pick there, DFlash's the one the batch ranks first."""
    if index >= max(len(expected), len(got)):
        return Divergence(None, None, None, False)
    n = len(prompt)
    # the batch: `width` tokens of the target alone's text (fewer where it ends) from start, whose first rows predict
    # expected[start + 1 .. index]; whole, since a batch's width is what makes it round otherwise (a divergence near
    # the start of the text was once compared with a "batch" of one token, which rounds as one token does)
    start = max(index - width, 0)
    tg.clear()
    one_token = {0: tg.decode(prompt, 0, all_logits=False)[0].copy()}  # j -> the logits that chose expected[j]
    for j in range(index):
        if j == start and tg.recurrent:  # where the batch starts: a recurrent state comes back to it, not cut
            tg.save_state()
        logits = tg.decode([expected[j]], n + j, all_logits=False)[0]
        if j + 1 >= start:
            one_token[j + 1] = logits.copy()
    here = one_token[index]
    bound, batch_picks, row = 0.0, None, here
    if index > start:
        tg.rollback(n + start, n + start, [])
        batch = tg.decode(expected[start:start + width], n + start, all_logits=True)
        bound = max(float(np.abs(batch[r] - one_token[start + r + 1]).max()) for r in range(index - start))
        row = batch[index - start - 1]
    tg.clear()
    own = expected[index] if index < len(expected) else int(np.argmax(here))
    dflash = got[index] if index < len(got) else next(int(t) for t in np.argsort(-row) if tg.is_eog(int(t)))
    if index > start:
        batch_picks = int(np.argmax(row)) == dflash
    gap = float(here[own] - here[dflash])
    return Divergence(gap, bound, batch_picks, 0.0 <= gap <= bound)
