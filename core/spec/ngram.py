"""Prompt-lookup (n-gram) drafting: guess the next tokens by finding the sequence's own tail
earlier in the sequence and copying what followed it.

No model runs, so the proposer costs only host time; it pays off on repetitive text (code, edits
of the prompt, quoted passages). It runs per request per step, so the search is vectorised:
find every earlier occurrence of the last token, then narrow that set one token further back at a
time. Cost is one list -> array copy plus a few passes over the window (~0.1-0.2 ms for 4096
tokens), whatever the text; a Python scan would be 10x slower on repetitive input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(
    tokens: Sequence[int],
    num_draft: int,
    max_ngram: int = 4,
    min_ngram: int = 1,
    window: int = 4096,
) -> list[int]:
    """Up to `num_draft` tokens that followed an earlier occurrence of the longest suffix n-gram
    (max_ngram >= n >= min_ngram) within the last `window` tokens; [] when none matches.

    `tokens` is the request's prompt + output so far. The match is the longest n-gram with an
    occurrence followed by `num_draft` tokens, at its most recent such occurrence; when no n-gram
    has one, the longest n-gram at its earliest occurrence (the longest continuation). So in a
    run "5 7 7 7 7" the 1-gram "7" wins and a whole `num_draft` tokens come back, where the
    longer "7 7 7" only recurs one token back. A match may overlap the suffix but is never the
    suffix itself; fewer than `num_draft` tokens come back when the sequence ends first.

    >>> propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], num_draft=3)
    [7, 8, 5]
    >>> propose_ngram([1, 2, 3, 4], num_draft=3)
    []
    >>> propose_ngram([5, 7, 7, 7, 7], num_draft=3)
    [7, 7, 7]
    """
    if num_draft <= 0 or min_ngram < 1 or max_ngram < min_ngram:
        return []
    tail = tokens[-window:] if window > 0 else []
    seq = np.fromiter(tail, dtype=np.int64, count=len(tail))  # [L]
    length = seq.shape[0]
    max_ngram = min(max_ngram, length - 1)  # the whole window cannot occur earlier in itself
    if max_ngram < min_ngram:
        return []
    # ends: positions e < L - 1 where the last n tokens occur ending at e, most recent last.
    ends = np.flatnonzero(seq[:-1] == seq[-1])
    full_end, full_n = -1, 0  # the longest n with an occurrence followed by num_draft tokens
    some_end, some_n = -1, 0  # the longest n at all, at its earliest occurrence
    n = 1
    while ends.size:
        full = ends[ends + num_draft <= length - 1]
        if full.size:
            full_end, full_n = int(full[-1]), n
        some_end, some_n = int(ends[0]), n
        if n == max_ngram:
            break
        ends = ends[ends >= n]  # the occurrence must start inside the window
        ends = ends[seq[ends - n] == seq[length - 1 - n]]
        n += 1
    best_end, best_n = (full_end, full_n) if full_n >= min_ngram else (some_end, some_n)
    if best_n < min_ngram:
        return []
    return seq[best_end + 1 : best_end + 1 + num_draft].tolist()
