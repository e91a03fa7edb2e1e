"""Greedy decoding streamed one block at a time, every request of a call in the same block visits.

A generated token needs every block, so each token is one pass over the blocks.  Streaming a block
costs the same whatever the number of rows it serves, so all rows go through each visit: in groups of
`batch_size` rows per forward call, each group left-padded as HF generate pads a batch, with its own
key/value cache.  Between visits a group's cache entry for the block (and, while the contexts are being
read, its hidden states) waits where hidden states would: on the device, in host memory, or in a file,
chosen for all groups at once against the memory limits (placement.choose_placement), as for scoring.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

from .. import progress as progress_bars
from ..blocks import DecoderStack, kv_cache, left_padded, with_cache
from ..errors import StreamPruneError
from .loglikelihood import chunked


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
    again for each block visit rather than kept for every group of the round at once."""

    def __init__(self, number: int, contexts: list[list[int]], inputs, device: torch.device, max_new_tokens: int):
        self.number, self.device, self.inputs, self.contexts = number, device, inputs, contexts
        self.ids, self.mask, self.positions = left_padded(contexts, device)
        self.capacity = self.ids.shape[1] + max_new_tokens  # positions its cache can reach
        self.hidden, self.kwargs = inputs(self.ids, attention_mask=self.mask, position_ids=self.positions)
        self.cache = kv_cache(self.kwargs[0])
        if self.cache is None:
            raise StreamPruneError("this model's decoder built no key/value cache; it cannot be decoded streamed")
        self.padding = (self.mask == 0)[..., None]
        self.new: list[list[int]] = [[] for _ in contexts]
        self.done = [False] * len(contexts)
        self.reading = True  # the first pass, over the contexts
        self.hidden_parked = False

    def run(self, block, index: int, parking: _Parking | None) -> None:
        """Block `index` over this group's hidden states (its cache entry fetched first where parked)."""
        layer = self.cache.layers[index]
        if parking is not None and layer.is_initialized:
            layer.keys = parking.fetch(f"{self.number}-{index}k", layer.keys)
            layer.values = parking.fetch(f"{self.number}-{index}v", layer.values)
        if self.hidden_parked:
            self.hidden, self.hidden_parked = parking.fetch(f"{self.number}-h", self.hidden), False
        if self.kwargs is None:  # reading, after block 0: this visit's arguments, with this group's cache
            kwargs = with_cache(self.inputs(self.ids, attention_mask=self.mask, position_ids=self.positions)[1][index], self.cache)
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
        logits need no other)."""
        if self.reading and last:
            self.hidden = self.hidden[:, -1:].clone()
        if parking is None:
            return
        layer = self.cache.layers[index]
        # a full-attention layer only appends; a sliding-window one drops its oldest positions
        appends = type(layer) is DynamicLayer
        capacity = self.capacity if appends else 0  # a sliding window keeps fewer
        layer.keys = parking.park(f"{self.number}-{index}k", layer.keys, appends, capacity)
        layer.values = parking.park(f"{self.number}-{index}v", layer.values, appends, capacity)
        if self.reading and not last:
            self.hidden, self.hidden_parked = parking.park(f"{self.number}-h", self.hidden), True

    def step(self, logits_of, inputs, tokenizer, until, stop_ids, more: bool, processor=None) -> None:
        """The greedy next token of every row (argmax, first index on ties as torch.argmax), the stop
        rules applied per row, and with `more` the block inputs for the next pass.  A `processor` (a
        transformers LogitsProcessorList) first changes each row's float32 logits, as HF generate's,
        given that row's own tokens, without padding: HF generate's for a row alone (its repetition
        penalty leaves the padding out in any batch; its no_repeat_ngram_size counts it)."""
        logits = logits_of(self.hidden[:, -1:])[:, -1]
        if processor:
            logits = logits.float()
            for row, context in enumerate(self.contexts):
                if not self.done[row]:
                    ids = torch.tensor([context + self.new[row]], device=logits.device)
                    logits[row : row + 1] = processor(ids, logits[row : row + 1])
        token = logits.argmax(dim=-1)
        for row, value in enumerate(token.tolist()):
            if not self.done[row]:
                self.new[row].append(value)
                if value in stop_ids or (until and tokenizer and any(s in tokenizer.decode(self.new[row]) for s in until)):
                    self.done[row] = True
        self.reading = False
        if self.finished:  # its caches are freed now, not at the end of the round
            self.cache = self.kwargs = self.hidden = None
        if not more or self.finished:
            return
        rows = len(self.new)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self.hidden, self.kwargs = inputs(token[:, None], cache=self.cache, attention_mask=self.mask, position_ids=self.positions)

    @property
    def finished(self) -> bool:
        return all(self.done)


def _parked_bytes(stack: DecoderStack, first: _Group, groups: list[list[list[int]]], max_new_tokens: int) -> int:
    """The bytes a round parks at most: a token's keys and values in block 0 (2 x heads x head size x
    item size, from the first group's entry) for every block and every row's padded context and new
    tokens (an upper bound: sliding-window layers keep fewer), plus the contexts' hidden states."""
    layer = first.cache.layers[0]
    per_token = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
    padded = [len(group) * max(len(context) for context in group) for group in groups]  # context tokens
    tokens = sum(padded) + max_new_tokens * sum(len(group) for group in groups)
    return per_token * stack.num_blocks * tokens + stack.dtype.itemsize * stack.text_config.hidden_size * sum(padded)


@torch.no_grad()
def greedy_generate(stack: DecoderStack, contexts: list[list[int]], max_new_tokens: int, tokenizer=None,
                    until: list[str] | None = None, stop_ids=(), progress: bool = False, batch_size: int = 4,
                    max_resident_tokens: int = 2**18, processor=None) -> list[list[int]]:
    """Greedy continuations of token-id contexts, one block resident at a time, every row in each visit.

    contexts: lists of token ids (Python ints), none empty; rows next to each other decode together in groups of
    batch_size (callers put contexts of similar length together: lm-eval's order is longest first).
    Each group is left-padded with the attention mask and position ids (running count of real tokens)
    HF generate uses, so each row continues as it would alone (tests: equal to transformers' generate).
    The first pass runs every block over the contexts and fills each group's key/value cache; each
    later pass runs every block over one new token per row.  The caches wait between visits where the
    memory limits of the stack's budget put them (module docstring), in rounds of at most
    max_resident_tokens tokens.  A row stops at one of stop_ids or once its decoded text holds a string
    of `until`; a group stops when all its rows have, every row after max_new_tokens.  `processor`, a
    transformers LogitsProcessorList (a repetition penalty: harness._greedy_settings), changes each
    row's logits before its argmax as in HF generate.
    Returns the new token ids per row (a stop string's tokens included, as HF generate's stopping
    criteria).  Raises StreamPruneError for an empty context or a decoder without a key/value cache.
    """
    if not contexts or max_new_tokens <= 0:
        return [[] for _ in contexts]
    if min(len(c) for c in contexts) == 0:
        raise StreamPruneError("a generation context is empty")
    new: list = [None] * len(contexts)
    # rounds of whole groups, each at most max_resident_tokens context and new tokens: a round's masks and
    # call arguments stay on the device
    groups = [list(range(start, min(start + batch_size, len(contexts)))) for start in range(0, len(contexts), batch_size)]
    rounds = chunked(groups, lambda group: sum(len(contexts[n]) + max_new_tokens for n in group), max_resident_tokens)
    with stack.decoding() as (inputs, logits_of), \
            progress_bars.bar(total=max_new_tokens * len(rounds), desc="Generating", unit="token", enabled=progress, leave=False) as bar:
        for round_ in rounds:
            decoded = _decode(stack, [[contexts[n] for n in group] for group in round_], inputs, logits_of, max_new_tokens,
                              tokenizer, until, stop_ids, batch_size, bar, processor)
            for group, done in zip(round_, decoded):
                for n, tokens in zip(group, done.new):
                    new[n] = tokens
    return new


def _decode(stack: DecoderStack, groups: list[list[list[int]]], inputs, logits_of, max_new_tokens: int, tokenizer, until,
            stop_ids, batch_size: int, bar, processor) -> list[_Group]:
    """One round: every group through every block visit, a pass per generated token."""
    last = stack.num_blocks - 1
    live: list[_Group] = []
    parking: _Parking | None = None
    try:
        for step in range(max_new_tokens):
            for index in range(stack.num_blocks):
                block = stack.load_block(index)
                try:
                    if step == 0 and index == 0:  # groups are made as block 0 first reaches them
                        for number, rows in enumerate(groups):
                            group = _Group(number, rows, inputs, stack.device, max_new_tokens)
                            group.run(block, 0, parking)
                            if number == 0:
                                # the embedding and LM head stay resident through decoding
                                placement = stack.placement_of_bytes(_parked_bytes(stack, group, groups, max_new_tokens),
                                                                     batch_size * group.mask.shape[1], stack.resident_outside_bytes())
                                parking = None if placement == "device" else _Parking(placement, stack.device, stack.budget.offload_dir)
                            group.park(0, parking, last == 0)
                            live.append(group)
                    else:
                        for group in live:
                            if not group.finished:
                                group.run(block, index, parking)
                                group.park(index, parking, index == last)
                finally:
                    stack.free_block(index)
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
