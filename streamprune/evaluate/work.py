"""What an evaluation made the blocks compute, against reading each request alone: the measure of what
sharing contexts (a context before several answers, few-shot examples before every prompt) saved.

Every block computes the same token positions (the hidden states of every pass go through all of them),
so block 0's calls are counted: rows x columns of the hidden states it is given, padding included.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

from .loglikelihood import _common_length


@dataclass
class Work:
    """Counts over an evaluation's streamed requests (ints).

    requests: scored requests (a perplexity window, an answer after its context, a rolling window) and
        generated continuations.
    positions: token positions that went through each block (rows x columns of the hidden states block 0
        was called on, padding included): the work done.
    alone: the token positions each request would put through a block if read alone, without padding:
        a scored request's tokens but its last (only predicted), a continuation's context and its new
        tokens but the last (as transformers' generate with a key/value cache reads them; nothing
        where no token was asked for).
    least: the token positions no exact evaluation of the same requests can go below: their distinct
        prefixes (of what `alone` reads), each read once and unpadded, since a position's hidden state
        depends on every token before it; counted per call (StreamedLM shares within a call).
    Read alone, positions would be at least `alone` (padding adds to it); sharing makes it less, down to
    `least` at best.
    """

    requests: int = 0
    positions: int = 0
    alone: int = 0
    least: int = 0

    @classmethod
    def scored(cls, requests) -> "Work":
        """The requests (loglikelihood.Request) scored, what they take alone (tokens but the last), and
        at the least (their distinct prefixes)."""
        read = [request.tokens[:-1] for request in requests]
        return cls(len(requests), 0, sum(map(len, read)), distinct_prefixes(read))

    @classmethod
    def generated(cls, contexts, new) -> "Work":
        """The continuations generated after contexts (token lists), new their new tokens, and what they
        take alone (the context, then each new token but the last; nothing for no new token: none ran)
        and at the least (their distinct prefixes)."""
        read = [[*context, *tokens[:-1]] for context, tokens in zip(contexts, new) if tokens]
        return cls(len(contexts), 0, sum(map(len, read)), distinct_prefixes(read))

    @classmethod
    def from_dict(cls, values: dict) -> "Work":
        """The counts of as_dict's output (its ratio is computed again; `least` 0 where an older one lacks it)."""
        return cls(values["requests"], values["positions"], values["alone"], values.get("least", 0))

    def add(self, other: "Work") -> "Work":
        """Adds other's counts to these; returns self."""
        self.requests += other.requests
        self.positions += other.positions
        self.alone += other.alone
        self.least += other.least
        return self

    @property
    def ratio(self) -> float | None:
        """positions / alone: below 1 where sharing saved more than padding cost; None with nothing read."""
        return self.positions / self.alone if self.alone else None

    def as_dict(self) -> dict:
        """The counts and their ratio (rounded to 4 digits), for a results JSON."""
        ratio = self.ratio
        return {**asdict(self), "ratio": None if ratio is None else round(ratio, 4)}

    def describe(self) -> str:
        """One line: '812,345 token positions through each block for 4,000 requests; read one by one they
        would take 1,950,000 (0.42x)'."""
        if self.ratio is None:
            return f"{self.positions:,} token positions through each block for {self.requests:,} requests"
        return (f"{self.positions:,} token positions through each block for {self.requests:,} requests; "
                f"read one by one they would take {self.alone:,} ({self.ratio:.2f}x)")


def distinct_prefixes(sequences) -> int:
    """How many distinct non-empty prefixes the token sequences have (the nodes of their trie): 6 for
    [1, 2, 3], [1, 2, 4] and [5, 6].  In sorted order each sequence adds its tokens past those it shares
    with the one before it, so no trie is built (a perplexity run's windows would make one per token)."""
    count, previous = 0, ()
    for sequence in sorted(map(tuple, sequences)):
        count += len(sequence) - _common_length(previous, sequence)
        previous = sequence
    return count


@contextlib.contextmanager
def counting(stack, work: Work | None):
    """Adds to work.positions (when work is given) the token positions that go through stack's block 0
    inside the `with` block: a forward pre-hook, removed on leaving, whether or not the block raised.
    The caller adds the requests and what they take alone (Work.add)."""
    if work is None:
        yield
        return

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        work.positions += hidden.shape[0] * hidden.shape[1]

    hook = stack.blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
