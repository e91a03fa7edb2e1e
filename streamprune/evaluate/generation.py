"""Decoding streamed one block at a time, every request of a call in the same block visits: greedy, or
sampled with each row's own seeded generator.

A generated token needs every block, so each token is one pass over the blocks.  Streaming a block
costs the same whatever the number of rows it serves, so all rows go through each visit: in groups of
`batch_size` rows per forward call, each group left-padded as HF generate pads a batch, with its own
key/value cache.  Between visits a group's cache entry for the block (and, while the contexts are being
read, its hidden states) waits where hidden states would: on the device, in host memory, or in a file,
chosen for all groups at once against the memory limits (placement.choose_placement), as for scoring.

Contexts that begin with the same tokens (a few-shot task's examples before every question: gsm8k-CoT's
eight) read that start once: in each block visit of the first pass it runs through the block alone, and
each row of the groups after it attends to its keys and values as the first positions of its own cache
entry (_Group.run).  The start's keys and values are kept once per round, and each full-attention
layer's entry of a group holds only its rows' own positions between visits, the start's put before
them for the visit (benchmarks/README.md, "Generative few-shot prompts": 200 BoolQ questions answered
by generation after the same three examples peaked at 2.42 GiB, against 8.44 GiB unshared).  Which
starts are shared is chosen as for scoring (loglikelihood._sharing_plan: tokens through the blocks
saved), in each round only where the starts' keys and values fit on the compute device beside what
decoding keeps there (_starts_fit); a round where they do not reads its prompts whole.

Sampling draws each row's tokens with a torch.Generator of its own, seeded by the caller (one seed per
context): HF generate draws a batch's rows from torch's global generator, so which tokens a row gets
there depends on the rows beside it and the calls before; here it depends only on its seed, whatever
the batch size, the rounds, the memory limits or the shared starts, and equals what HF generate samples
for that context alone after torch.manual_seed(seed) (tests/test_generation.py).
"""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

from .. import progress as progress_bars
from ..blocks import DecoderStack, kv_cache, left_padded, with_cache
from ..errors import StreamPruneError
from .loglikelihood import MIN_SHARED_PREFIX, Request, _Contexts, _fill, _kv_values, _NoCache, _sharing_plan, chunked


class _Parking:
    """Holds tensors between block visits at a placement (placement module): `device` keeps them,
    `cpu` copies them into host memory, `disk` writes them to a file; the latter two return a meta
    tensor of the shape in their place (what transformers' cache reads between visits: the keys' shape,
    for the cache's length).

    Parked tensors are stored sequence-major, (positions, ...) with the positions axis (dim -2) moved to
    the front, so that a key/value cache that only grew since its last visit is parked by writing its
    new positions alone: one token's keys and values per decoding step instead of the whole cache (a
    file opened for appending; a host copy made with room for `capacity` positions). What goes back to
    the device is still the whole cache, which attention reads whole. Host copies are pageable memory of
    their exact size: pinned memory would come from torch's caching host allocator, which rounds each
    request up to a power of two and keeps it pinned after use, beyond what the memory limits allowed.
    `bytes_written` counts what went to files or host copies."""

    def __init__(self, placement: str, device: torch.device, directory: str | None):
        self.placement, self.device, self.folder = placement, device, None
        self.shapes: dict[str, torch.Size] = {}  # of what is parked under each name
        self.host: dict[str, torch.Tensor] = {}  # placement cpu: (capacity, ...) sequence-major copies
        self.bytes_written = 0
        if placement == "disk":
            try:
                self.folder = Path(tempfile.mkdtemp(prefix=".kv-cache-", dir=directory))
            except OSError as exc:
                raise StreamPruneError(f"cannot make a folder for the key/value cache in {directory or tempfile.gettempdir()}: "
                                       f"{exc.strerror}; choose another folder (streamprune eval --offload-dir, or offload_dir in --model_args)") from exc

    def park(self, name: str, tensor: torch.Tensor, appends: bool = False, capacity: int = 0) -> torch.Tensor:
        """Parks `tensor` (..., positions, last) under `name`; with `appends`, the positions parked under
        that name before are known to be its first ones, unchanged, and only the others are written.
        Returns what stands for it until fetch: the tensor itself on the device, else a meta tensor.
        Raises StreamPruneError when the file cannot be written."""
        if self.placement == "device":
            return tensor
        length, before = tensor.shape[-2], self.shapes.pop(name, None)
        same_rows = before is not None and before[:-2] == tensor.shape[:-2] and before[-1] == tensor.shape[-1]
        kept = before[-2] if appends and same_rows and before[-2] <= length else 0
        new = tensor[..., kept:, :].movedim(-2, 0)
        if self.placement == "cpu":
            store = self.host.get(name)
            if store is None or store.shape[0] < length or not same_rows:
                old = store
                store = torch.empty((max(capacity, length), *new.shape[1:]), dtype=tensor.dtype)
                if kept:
                    store[:kept].copy_(old[:kept])
                self.host[name] = store
            store[kept:length].copy_(new)
        else:
            try:
                with open(self.folder / name, "ab" if kept else "wb") as file:
                    file.write(new.to("cpu").contiguous().view(torch.uint8).numpy())
            except OSError as exc:
                raise StreamPruneError(f"cannot write the key/value cache to {self.folder}: {exc.strerror}") from exc
        self.shapes[name] = tensor.shape  # only once written: a failed write leaves no stale length
        self.bytes_written += new.numel() * new.element_size()
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

    def fetch(self, name: str, parked: torch.Tensor) -> torch.Tensor:
        """The tensor parked under `name`, on the device (with the shape and dtype of `parked`)."""
        if self.placement == "device":
            return parked
        if self.placement == "cpu":
            values = self.host[name][: parked.shape[-2]].to(self.device)
        else:
            major = (parked.shape[-2], *parked.shape[:-2], parked.shape[-1])
            values = torch.from_file(str(self.folder / name), size=parked.numel(), dtype=parked.dtype).view(major).to(self.device)
        return values.movedim(0, -2)

    def release(self, prefix: str) -> None:
        """Forgets every tensor parked under a name that starts with `prefix` (a group that finished, or
        its contexts' hidden states once read), so that its memory or file goes now, not with the round."""
        for name in [name for name in self.shapes if name.startswith(prefix)]:
            del self.shapes[name]
            self.host.pop(name, None)
            if self.folder is not None:
                (self.folder / name).unlink(missing_ok=True)

    def close(self) -> None:
        self.host.clear()
        self.shapes.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Group:
    """batch_size rows decoded together: left-padded ids, attention mask and position ids as HF generate
    builds them, the block inputs and call arguments the decoder's own forward makes from them, its key/
    value cache (transformers' class, as the decoder creates it) and the tokens generated so far.

    While the contexts are read, the call arguments (masks of rows x width^2, rotary tables) are made
    again for each block visit rather than kept for every group of the round at once.

    With a shared start (`start`: the _Contexts batch that runs it and its row there; `split`: its
    length, shorter than every context), the first pass reads only the columns from `split` on.  The
    columns before it hold, in each row, left padding and then the start's first tokens (the rest of
    the start, if the row is shorter than the group's longest, is read again with its other tokens), so
    each block's cache entry begins with those positions' keys and values, taken from the start's batch
    (_past), and the layout, masks and positions are those of the unshared group: each row continues
    as it would alone.  Between visits a full-attention layer's entry keeps only the columns from
    `split` on (its rows' own), and the decoder makes each pass's masks from `skeleton`, a cache of
    placeholders as long as the whole rows; a sliding-window layer's entry is kept whole (a window's
    length at most)."""

    def __init__(self, number: int, contexts: list[list[int]], inputs, device: torch.device, max_new_tokens: int,
                 start: tuple[_Contexts, int] | None = None, split: int = 0, placeholders=None, seeds: list[int] | None = None):
        self.number, self.device, self.inputs, self.contexts = number, device, inputs, contexts
        # sampling: a generator per row, on the device whose tensors it draws from (torch.multinomial's rule)
        self.generators = None if seeds is None else [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.ids, self.mask, self.positions = left_padded(contexts, device)
        self.capacity = self.ids.shape[1] + max_new_tokens  # positions its cache can reach
        self.start, self.split = (start, split) if start is not None else (None, 0)
        if self.start is None:
            self.hidden, self.kwargs = inputs(self.ids, attention_mask=self.mask, position_ids=self.positions)
            self.cache = kv_cache(self.kwargs[0])
        else:
            # the masks and positions of the columns read are made with a cache of placeholders as long
            # as the columns skipped (this one, kept for the visits' arguments), and the blocks extend
            # another, whose entries are the start's keys and values when the block is reached
            self.skeleton, self.cache = placeholders(split), placeholders(split)
            self.pads = (self.mask == 0).sum(dim=1).tolist()
            self.placeholder = torch.zeros((1, 1, 1, 1), dtype=self.skeleton.layers[0].keys.dtype, device=device)
            self.seen = split  # the columns the skeleton stands for
            self.hidden, self.kwargs = self._read_inputs()
        if self.cache is None:
            raise StreamPruneError("this model's decoder built no key/value cache; it cannot be decoded streamed")
        self.padding = (self.mask[:, self.split :] == 0)[..., None]
        self.new: list[list[int]] = [[] for _ in contexts]
        self.done = [False] * len(contexts)
        self.reading = True  # the first pass, over the contexts
        self.hidden_parked = False

    def _read_inputs(self) -> tuple[torch.Tensor, dict[int, dict]]:
        """Block 0's inputs and every block's arguments for the first pass over the columns read."""
        if self.start is None:
            return self.inputs(self.ids, attention_mask=self.mask, position_ids=self.positions)
        hidden, kwargs = self.inputs(self.ids[:, self.split :], cache=self.skeleton, attention_mask=self.mask,
                                     position_ids=self.positions[:, self.split :])
        return hidden, {index: with_cache(arguments, self.cache) for index, arguments in kwargs.items()}

    def _past(self, entry: torch.Tensor, length: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """The keys (or values) of the columns before `split`, for the last `length` of them (a sliding
        window's cache keeps fewer), followed by `own` (rows, heads, positions, head_dim; the rows' own
        columns, kept between visits) if given: (rows, heads, length + positions, head_dim), each row's
        padding zeros (masked) and then its start's first positions, from the start batch's entry (its
        rows, heads, width, head_dim; the start at its right end, every position kept).  Made anew at
        each visit; every element is written once, a zero or a copy."""
        row = self.start[1]
        width, split = entry.shape[-2], self.split
        after = 0 if own is None else own.shape[-2]
        out = entry.new_empty((len(self.pads), entry.shape[1], length + after, entry.shape[-1]))
        for r, pad in enumerate(self.pads):
            first = max(split - length, pad)  # the first column of the row's start kept here
            out[r, :, : min(max(first - (split - length), 0), length)].zero_()
            if first < split:
                out[r, :, first - (split - length) : length] = entry[row, :, width - split + first - pad : width - pad]
        if after:
            out[:, :, length:] = own
        return out

    def run(self, block, index: int, parking: _Parking | None) -> None:
        """Block `index` over this group's hidden states (its cache entry fetched first where parked; in
        the first pass of a shared start, made from the start's)."""
        layer = self.cache.layers[index]
        if parking is not None and layer.is_initialized and not self.reading:
            layer.keys = parking.fetch(f"{self.number}-{index}k", layer.keys)
            layer.values = parking.fetch(f"{self.number}-{index}v", layer.values)
        if self.start is not None and (self.reading or type(layer) is DynamicLayer):
            entry = self.start[0].cache.layers[index]
            # reading: the placeholder's length (a window's, or split); later a full layer's own columns
            length, own = (layer.keys.shape[-2], None) if self.reading else (self.split, (layer.keys, layer.values))
            layer.keys = self._past(entry.keys, length, None if own is None else own[0])
            layer.values = self._past(entry.values, length, None if own is None else own[1])
        if self.hidden_parked:
            self.hidden, self.hidden_parked = parking.fetch(f"{self.number}-h", self.hidden), False
        if self.kwargs is None:  # reading, after block 0: this visit's arguments, with this group's cache
            kwargs = self._read_inputs()[1][index]
            if self.start is None:
                kwargs = with_cache(kwargs, self.cache)
        else:
            kwargs = self.kwargs[index]
        out = block(self.hidden, **kwargs)
        self.hidden = out[0] if isinstance(out, tuple) else out
        if self.reading:  # a padding position attends to nothing (NaN in eager attention); nothing reads it
            self.hidden = self.hidden.masked_fill(self.padding, 0)
            self.kwargs = None

    def park(self, index: int, parking: _Parking | None, last: bool) -> None:
        """Block `index`'s cache entry, and while the contexts are read their hidden states (as large),
        parked until the next visit; of the last block's outputs only the last position is kept (the
        logits need no other).  After a shared start, a full-attention entry keeps only the columns from
        `split` on, wherever it waits (on the device too): run puts the start's before them again."""
        if self.reading and last:
            self.hidden = self.hidden[:, -1:].clone()
        layer = self.cache.layers[index]
        # a full-attention layer only appends; a sliding-window one drops its oldest positions
        appends = type(layer) is DynamicLayer
        if self.start is not None and appends:  # the start's columns are put back at the next visit
            layer.keys, layer.values = layer.keys[:, :, self.split :].clone(), layer.values[:, :, self.split :].clone()
        if parking is None:
            return
        capacity = self.capacity - self.split if appends else 0  # a sliding window keeps fewer
        layer.keys = parking.park(f"{self.number}-{index}k", layer.keys, appends, capacity)
        layer.values = parking.park(f"{self.number}-{index}v", layer.values, appends, capacity)
        if self.reading and not last:
            self.hidden, self.hidden_parked = parking.park(f"{self.number}-h", self.hidden), True

    def step(self, logits_of, inputs, tokenizer, until, stop_ids, more: bool, processor=None) -> None:
        """The next token of every row, the stop rules applied per row, and with `more` the block inputs
        for the next pass.  Greedy: the argmax (first index on ties, as torch.argmax).  Sampling (the
        group has generators): one torch.multinomial draw from the softmax of the row's float32 logits
        with the row's generator, as HF generate's _sample draws for a batch of that row alone.  A
        `processor` (a transformers LogitsProcessorList: penalties, and when sampling the warpers, in HF
        generate's order) first changes each row's float32 logits, as HF generate's, given that row's own
        tokens, without padding: HF generate's for a row alone (its repetition penalty leaves the padding
        out in any batch; its no_repeat_ngram_size counts it)."""
        logits = logits_of(self.hidden[:, -1:])[:, -1]
        if processor or self.generators:  # HF generate processes, and samples from, float32 logits
            logits = logits.float()
        if processor:
            for row, context in enumerate(self.contexts):
                if not self.done[row]:
                    ids = torch.tensor([context + self.new[row]], device=logits.device)
                    logits[row : row + 1] = processor(ids, logits[row : row + 1])
        if self.generators is None:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            # a finished row's draw would be thrown away; it is not made, so its generator is left as it was
            token = torch.tensor([0 if self.done[row] else int(torch.multinomial(probs[row : row + 1], 1, generator=generator))
                                  for row, generator in enumerate(self.generators)], device=self.device)
        for row, value in enumerate(token.tolist()):
            if not self.done[row]:
                self.new[row].append(value)
                if value in stop_ids or (until and tokenizer and any(s in tokenizer.decode(self.new[row]) for s in until)):
                    self.done[row] = True
        self.reading = False
        if self.finished:  # its caches are freed now, not at the end of the round
            self.cache = self.kwargs = self.hidden = self.start = None
            self.skeleton = None
        if not more or self.finished:
            return
        rows = len(self.new)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        if self.start is None:
            self.hidden, self.kwargs = inputs(token[:, None], cache=self.cache, attention_mask=self.mask, position_ids=self.positions)
            return
        more_columns = self.mask.shape[1] - 1 - self.seen  # the skeleton as long as the rows' cache entries
        if more_columns:
            columns = self.placeholder.expand(1, 1, more_columns, 1)
            for index in range(len(self.skeleton.layers)):
                self.skeleton.update(columns, columns, index)
            self.seen += more_columns
        self.hidden, kwargs = inputs(token[:, None], cache=self.skeleton, attention_mask=self.mask, position_ids=self.positions)
        self.kwargs = {index: with_cache(arguments, self.cache) for index, arguments in kwargs.items()}

    @property
    def finished(self) -> bool:
        return all(self.done)


def _placeholders(cache_class, config, dtype: torch.dtype, device: torch.device, length: int):
    """A key/value cache of `cache_class` (transformers' own, made from the decoder's config) whose every
    layer holds a placeholder (1, 1, length, 1) as its past: the decoder's forward makes the masks of
    tokens after `length` others from it, sliding windows included (a sliding layer keeps fewer)."""
    try:
        cache = cache_class(config=config)
    except TypeError:  # a cache class built otherwise than transformers' DynamicCache
        raise _NoCache from None
    placeholder = torch.zeros((1, 1, length, 1), dtype=dtype, device=device)
    for index in range(len(cache.layers)):
        cache.update(placeholder, placeholder, index)
    return cache


def _parked_bytes(stack: DecoderStack, first: _Group, groups: list[list[list[int]]], max_new_tokens: int,
                  splits: list[int] | None = None) -> int:
    """The bytes a round parks at most: a token's keys and values in block 0 (2 x heads x head size x
    item size, from the first group's entry) for every block and every row's padded context and new
    tokens (an upper bound: sliding-window layers keep fewer), plus the contexts' hidden states.  Of a
    group after a shared start of splits[g] tokens, the columns from there on: its full-attention
    layers keep no others between visits, and its first pass reads no others."""
    layer = first.cache.layers[0]
    per_token = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
    splits = splits or [0] * len(groups)
    padded = [len(group) * max(len(context) for context in group) for group in groups]  # context tokens
    own = [len(group) * (max(len(context) for context in group) - split) for group, split in zip(groups, splits)]
    new = max_new_tokens * sum(len(group) for group in groups)
    sliding = sum(type(layer) is not DynamicLayer for layer in first.cache.layers)  # they keep a start's columns too
    tokens = (stack.num_blocks - sliding) * (sum(own) + new) + sliding * (sum(padded) + new)
    return per_token * tokens + stack.dtype.itemsize * stack.text_config.hidden_size * sum(own)


@torch.no_grad()
def generate(stack: DecoderStack, contexts: list[list[int]], max_new_tokens: int, tokenizer=None,
             until: list[str] | None = None, stop_ids=(), progress: bool = False, batch_size: int = 4,
             max_resident_tokens: int = 2**18, processor=None, share_contexts: bool = True,
             seeds: list[int] | None = None) -> list[list[int]]:
    """Continuations of token-id contexts, greedy or sampled, one block resident at a time, every row in
    each visit.

    contexts: lists of token ids (Python ints), none empty; rows next to each other decode together in groups of
    batch_size (callers put contexts of similar length together: lm-eval's order is longest first; the
    rows after a shared start, below, are grouped apart, longest first).
    Each group is left-padded with the attention mask and position ids (running count of real tokens)
    HF generate uses, so each row continues as it would alone (tests: equal to transformers' generate).
    The first pass runs every block over the contexts and fills each group's key/value cache; each
    later pass runs every block over one new token per row.  The caches wait between visits where the
    memory limits of the stack's budget put them (module docstring), in rounds of at most
    max_resident_tokens tokens.  A row stops at one of stop_ids or once its decoded text holds a string
    of `until`; a group stops when all its rows have, every row after max_new_tokens.  `processor`, a
    transformers LogitsProcessorList (a repetition penalty: harness._generation_settings), changes each
    row's logits before its argmax as in HF generate.  With `seeds` (an int per context, 0 <= seed <
    2**63), each row's tokens are sampled instead (_Group.step), with a torch.Generator seeded with its
    seed: `processor` then holds HF generate's sampling warpers too (harness._generation_settings), and
    a row's tokens equal what HF generate(do_sample=True) gives its context alone after
    torch.manual_seed(seed).  With share_contexts, contexts that begin with
    the same tokens (at least MIN_SHARED_PREFIX of them, where that saves tokens through the blocks)
    are grouped together, longest first, and their start is read once per round (module docstring);
    the tokens are the same.
    Returns the new token ids per row (a stop string's tokens included, as HF generate's stopping
    criteria).  Raises StreamPruneError for an empty context or a decoder without a key/value cache,
    ValueError for seeds not one per context.
    """
    if seeds is not None and len(seeds) != len(contexts):
        raise ValueError(f"{len(seeds)} seeds for {len(contexts)} contexts")
    if not contexts or max_new_tokens <= 0:
        return [[] for _ in contexts]
    if min(len(c) for c in contexts) == 0:
        raise StreamPruneError("a generation context is empty")
    new: list = [None] * len(contexts)
    with stack.decoding() as (inputs, logits_of):
        placeholders = _shareable(stack, inputs, contexts[0]) if share_contexts else None
        groups = _groups(contexts, batch_size, placeholders is not None)
        # rounds of whole groups, each at most max_resident_tokens context and new tokens: a round's masks
        # and call arguments stay on the device
        # (a shared start's tokens once in its round, _starts_fit)
        rounds = chunked(groups, lambda group: sum(len(contexts[n]) - group[1] + max_new_tokens for n in group[0]), max_resident_tokens)
        rounds = [round_ if _starts_fit(stack, [([contexts[n] for n in rows], split) for rows, split in round_], batch_size)
                  else _unshared(round_, batch_size) for round_ in rounds]
        with progress_bars.bar(total=max_new_tokens * len(rounds), desc="Generating", unit="token", enabled=progress, leave=False) as bar:
            for round_ in rounds:
                decoded = _decode(stack, [([contexts[n] for n in rows], split) for rows, split in round_], inputs, logits_of,
                                  max_new_tokens, tokenizer, until, stop_ids, batch_size, bar, processor, placeholders,
                                  None if seeds is None else [[seeds[n] for n in rows] for rows, _ in round_])
                for (rows, _), done in zip(round_, decoded):
                    for n, tokens in zip(rows, done.new):
                        new[n] = tokens
    return new


def _shareable(stack: DecoderStack, inputs, context: list[int]):
    """How to make the placeholder caches of shared starts (_placeholders, given a length), or None when
    this decoder's cache cannot hold one: no cache, a class not made from a config, or sliding-window
    layers that cannot be told to keep every position (a row padded more than another needs positions
    of the start that its window has passed)."""
    cache = kv_cache(inputs(torch.tensor([context[:1]]))[1][0])
    if cache is None:
        return None
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    if any(not hasattr(layer, "activate_past_recording") for layer in sliding):
        return None
    make = partial(_placeholders, type(cache), stack.decoder.config, stack.dtype, stack.device)
    try:
        make(1)
    except _NoCache:
        return None
    return make


def _groups(contexts: list[list[int]], batch_size: int, share: bool) -> list[tuple[list[int], int]]:
    """The rows decoded together, batch_size at most, and the length of the start they share (0: none).

    With `share`, the contexts whose start loglikelihood._sharing_plan shares (each context taken as
    one request of a one-token answer: sharing a start of L tokens saves L per context) form groups of
    their own, longest first, the start cut to one token shorter than the shortest of them (every row
    reads its last token in the first pass); the others keep the callers' order.  A context given
    several times (lm-eval's repeats of a sampled task: gsm8k-cot-self-consistency's 64) is a row each
    time, so each copy is its own context for the plan (a marker token after it, -1 - copy, that no
    row reads): its copies can share the whole of it but the last token."""
    shared, alone = [], list(range(len(contexts)))
    if share:
        copies: dict[tuple, int] = {}
        marked = []
        for context in contexts:
            key = tuple(context)
            copy = copies[key] = copies.get(key, -1) + 1
            marked.append(Request((*context, -1 - copy, 0), len(context) + 1))
        plan = _sharing_plan(marked)
        alone = []
        for split, numbers in plan:
            split = min(split, min(len(contexts[n]) for n in numbers) - 1)
            if len(numbers) > 1 and split >= MIN_SHARED_PREFIX:
                shared.append((sorted(numbers, key=lambda n: (-len(contexts[n]), n)), split))
            else:
                alone += numbers
        alone.sort()
    return [group for numbers, split in shared for group in _batched(numbers, batch_size, split)] + _batched(alone, batch_size)


def _start_bytes(stack: DecoderStack, groups: list[tuple[list[list[int]], int]], batch_size: int) -> tuple[int, int]:
    """(bytes, widest) of a round's shared starts on the compute device: every block's keys and values
    of their batches (as _starts makes them, padded) held through the round, and their hidden states
    while they are read; and the most tokens a block at work may take at once (rows x width): a batch
    of starts, or batch_size rows of the round's longest context."""
    longest = batch_size * max(len(context) for rows, _ in groups for context in rows)
    lengths = sorted((len(start) for start in {tuple(rows[0][:split]) for rows, split in groups if split}), reverse=True)
    if not lengths:
        return 0, longest
    padded = [len(part) * part[0] for part in _fill(lengths, lambda length: length, batch_size * lengths[0])]
    config = stack.text_config
    return sum(padded) * (config.hidden_size + _kv_values(config) * stack.num_blocks) * stack.dtype.itemsize, max(longest, *padded)


def _starts_fit(stack: DecoderStack, groups: list[tuple[list[list[int]], int]], batch_size: int) -> bool:
    """Whether a round's shared starts (_start_bytes) fit on the compute device beside a block at work
    and what decoding keeps there (the embedding and the LM head): the memory limits would place them
    there (as loglikelihood._sharing_fits asks for scoring)."""
    held, widest = _start_bytes(stack, groups, batch_size)
    return not held or stack.placement_of_bytes(held, widest, stack.resident_outside_bytes()) == "device"


def _batched(numbers: list[int], batch_size: int, split: int = 0) -> list[tuple[list[int], int]]:
    """Rows in groups of batch_size, in the order given, each with the length of the start they share."""
    return [(numbers[i : i + batch_size], split) for i in range(0, len(numbers), batch_size)]


def _unshared(round_: list[tuple[list[int], int]], batch_size: int) -> list[tuple[list[int], int]]:
    """A round's rows in groups of batch_size, in the callers' order, none after a shared start."""
    return _batched(sorted(n for numbers, _ in round_ for n in numbers), batch_size)


class _Start:
    """A start that some contexts share (loglikelihood._Contexts runs what has a `prefix`)."""

    def __init__(self, prefix: tuple[int, ...]):
        self.prefix = prefix


def _starts(stack: DecoderStack, groups: list[tuple[list[list[int]], int]], inputs, batch_size: int) -> dict[tuple, tuple[_Contexts, int]]:
    """The round's distinct shared starts in batches (_Contexts, of similar lengths, batch_size of the
    longest), each batch's cache keeping every position of its sliding-window layers: {start: (its
    batch, its row there)}."""
    distinct = sorted({tuple(rows[0][:split]) for rows, split in groups if split}, key=len, reverse=True)
    if not distinct:
        return {}
    where = {}
    for part in _fill(distinct, len, batch_size * len(distinct[0])):
        batch = _Contexts([_Start(prefix) for prefix in part], inputs, stack)
        for layer in batch.cache.layers:
            if getattr(layer, "is_sliding", False):
                layer.activate_past_recording()
        where.update({prefix: (batch, row) for row, prefix in enumerate(part)})
    return where


def _decode(stack: DecoderStack, groups: list[tuple[list[list[int]], int]], inputs, logits_of, max_new_tokens: int, tokenizer,
            until, stop_ids, batch_size: int, bar, processor, placeholders=None, seeds: list[list[int]] | None = None) -> list[_Group]:
    """One round: every group (its contexts, the length of the start they share) through every block
    visit, a pass per generated token; the shared starts through each block first in the first pass.
    `seeds`: when sampling, each group's rows' seeds."""
    last = stack.num_blocks - 1
    live: list[_Group] = []
    parking: _Parking | None = None
    starts: dict = {}
    try:
        for step in range(max_new_tokens):
            for index in range(stack.num_blocks):
                block = stack.load_block(index)
                try:
                    if step == 0 and index == 0:  # groups are made as block 0 first reaches them
                        starts = _starts(stack, groups, inputs, batch_size)
                        batches = list({id(batch): batch for batch, _ in starts.values()}.values())
                        for batch in batches:
                            batch.run(block, 0)
                        # the starts' hidden states (while read) and keys and values (every block's, through
                        # the round) stay on the device; a block at work may take the widest group or start
                        held, widest = _start_bytes(stack, groups, batch_size)
                        for number, (rows, split) in enumerate(groups):
                            start = starts[tuple(rows[0][:split])] if split else None
                            group = _Group(number, rows, inputs, stack.device, max_new_tokens, start, split, placeholders,
                                           None if seeds is None else seeds[number])
                            group.run(block, 0, parking)
                            if number == 0:
                                # the embedding and LM head stay resident through decoding
                                placement = stack.placement_of_bytes(
                                    _parked_bytes(stack, group, [rows for rows, _ in groups], max_new_tokens, [split for _, split in groups]),
                                    widest, stack.resident_outside_bytes() + held)
                                parking = None if placement == "device" else _Parking(placement, stack.device, stack.budget.offload_dir)
                            group.park(0, parking, last == 0)
                            live.append(group)
                    else:
                        if step == 0:
                            for batch in batches:
                                batch.run(block, index)
                        for group in live:
                            if not group.finished:
                                group.run(block, index, parking)
                                group.park(index, parking, index == last)
                finally:
                    stack.free_block(index)
            if step == 0:
                for batch in batches:  # read: their hidden states and masks go, their keys and values stay for the round
                    batch.hidden = batch.kwargs = batch.padding = None
                starts = batches = None
            for group in live:
                if not group.finished:
                    group.step(logits_of, inputs, tokenizer, until, stop_ids, more=step + 1 < max_new_tokens, processor=processor)
                    if parking is not None:  # what no later visit reads goes now
                        parking.release(f"{group.number}-" if group.finished else f"{group.number}-h")
            bar.update()
            if all(group.finished for group in live):
                bar.update(max_new_tokens - step - 1)  # the steps no row needs: the round is done, its bar full
                break
    finally:
        if parking is not None:
            parking.close()
    return live
