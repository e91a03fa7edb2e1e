"""A model whose decoder blocks are materialised one at a time.

The whole model is built on the `meta` device (no memory), with its buffers real, so non-persistent
buffers such as the rotary `inv_freq` are computed by transformers itself.  To get the inputs of the
blocks, the decoder's own forward runs with every block replaced by a recorder that returns its
input unchanged: the recorder of block 0 keeps the hidden states (embedding scale, learned positions
and projections included, where a model has them) and every recorder keeps the keyword arguments its
block is called with (causal or sliding-window mask, rotary position embeddings, position ids).  Block
i is then called exactly as the model would call it, with transformers' own decoder-layer class and the
mask built by transformers.  Logits come the same way from the model's own forward after its last
block (output_head).  Where the decoder and its blocks are is derived (families.derive_layout).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, Cache, PretrainedConfig

from .checkpoint import CheckpointReader
from .checks import check_fits
from .errors import StreamPruneError
from .families import Layout, block_index, derive_layout
from .placement import Budget, FileStates, TensorStates, choose_placement, make_states, pin_host_states, pinned_bytes


@dataclass
class Activations:
    """Hidden states of rows of equal length, and the keyword arguments each block is called with on them.

    The arguments (mask, rotary position embeddings, position ids) come from a call on one row; they
    broadcast over any batch of rows of that length.  The states live where placement put them.
    """

    hidden: TensorStates | FileStates  # (rows, seqlen, hidden_size)
    block_kwargs: dict[int, dict]
    placement: str = "device"

    def close(self) -> None:
        self.hidden.close()


def _release(module: nn.Module) -> None:
    """Every parameter of `module` back to the meta device, freeing its memory."""
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None and param.device.type != "meta":
                submodule._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
            return libc
        return None
    except OSError:  # no C library to load: nothing to do
        return None


_GLIBC = _glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def return_freed_memory() -> None:
    """Hands memory freed by a block back to the system.

    glibc keeps freed chunks of a few MB in its heap, and blocks of mixed tensor sizes fragment it: on
    SmolLM2, resident memory grew by 25 MB per block (to 1.5 GB over 30 blocks of 18 MB) without this.
    """
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def reuse_freed_memory() -> None:
    """Lets glibc keep activation buffers (up to 32 MiB each) it frees within a block, for the next batch.

    By default it maps buffers of a few MB afresh and unmaps them when freed, so every forward pass pays
    page faults on memory the previous batch just gave up: 15% of a bfloat16 SmolLM2 run on a CPU.  What
    the heap keeps is handed back after each block (return_freed_memory), so memory does not grow with
    the layers.  The setting is process-wide, as glibc's are.
    """
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        _GLIBC.mallopt(_M_TRIM_THRESHOLD, 2**30)


def blocks_beyond_config(keys, layout: Layout) -> list[str]:
    """A problem when tensors belong to blocks past the config's num_hidden_layers (none otherwise)."""
    extra = sorted(i for i in (block_index(layout, key) for key in keys) if i is not None and i >= layout.num_blocks)
    if not extra:
        return []
    return [f"the checkpoint has blocks up to {extra[-1]} but the config says num_hidden_layers = {layout.num_blocks}"]


def shape_problems(expected: dict[str, tuple[int, ...]], present: dict[str, tuple[int, ...]]) -> list[str]:
    """Expected tensors that are missing or stored in another shape, in words."""
    problems = []
    for name, shape in expected.items():
        if name not in present:
            problems.append(f"tensor {name} is missing from the checkpoint")
        elif present[name] != shape:
            problems.append(f"tensor {name} has shape {list(present[name])} in the checkpoint; the config implies {list(shape)}")
    return problems


def empty_model(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model for `config` with its parameters on the meta device (no memory) and its buffers real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def tied_sources(model: nn.Module, config: PretrainedConfig) -> dict[str, str]:
    """{tied tensor: the tensor it is stored as}, as transformers ties them (a tied LM head is stored
    once, as the input embedding)."""
    if hasattr(model, "get_expanded_tied_weights_keys"):
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    names = {module: name for name, module in model.named_modules()}
    return {f"{names[head]}.weight": f"{names[embedding]}.weight"}


def expected_shapes(model: nn.Module, config: PretrainedConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint for `model` must hold, by their stored names (tied ones once)."""
    tied = tied_sources(model, config)
    return {layout.stored_name(name): tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def left_padded(contexts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id rows of different lengths, left-padded as HF generate pads them: ids and attention mask
    (1 real, 0 padding), both (rows, longest) int64 on `device`, and position ids counting real tokens
    only, so that each row runs as it would alone."""
    longest = max(len(c) for c in contexts)
    ids = torch.zeros((len(contexts), longest), dtype=torch.long)
    mask = torch.zeros((len(contexts), longest), dtype=torch.long)
    for row, context in enumerate(contexts):
        ids[row, longest - len(context) :] = torch.tensor(context)
        mask[row, longest - len(context) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def kv_cache(block_kwargs: dict):
    """The key/value cache (transformers' Cache) among a block's call arguments, or None."""
    return next((value for value in block_kwargs.values() if isinstance(value, Cache)), None)


def with_cache(block_kwargs: dict, cache) -> dict:
    """A block's call arguments with `cache` in place of the key/value cache among them."""
    return {name: cache if isinstance(value, Cache) else value for name, value in block_kwargs.items()}


class _ZeroEmbedding(nn.Module):
    """Stands in for the input embedding when only the model's code after the blocks matters."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.width, self.dtype, self.device = width, dtype, device

    def forward(self, input_ids, *args, **kwargs):
        return torch.zeros(*input_ids.shape, self.width, dtype=self.dtype, device=self.device)


class _Stand(nn.Module):
    """Stands in for block `index`: records its input (block 0) and call arguments in `state` and returns
    the input; while state["inject"] holds hidden states, the last block returns those instead, so that
    the model's forward computes its logits from them."""

    def __init__(self, index: int, state: dict, last: bool):
        super().__init__()
        self.index, self.state, self.last = index, state, last

    def forward(self, hidden_states, *args, **kwargs):
        if self.state["inject"] is not None:
            return self.state["inject"] if self.last else hidden_states
        if args:
            raise RuntimeError("decoder blocks are expected to take their options as keyword arguments")
        self.state["kwargs"][self.index] = kwargs
        if self.index == 0:
            self.state["hidden"] = hidden_states
        return hidden_states


class DecoderStack:
    """The model skeleton plus a reader: load block i, call it, free it.

    Where the blocks are, and what the checkpoint calls their tensors, is derived from the model
    (families.derive_layout).  Everything outside the blocks (embeddings, positions, norms, the LM head)
    is read only when the model's own forward calls it, so a multimodal model's vision tower is never
    read, and is released afterwards.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        reader: CheckpointReader,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool = False,
        budget: Budget | None = None,
    ):
        reuse_freed_memory()
        self.budget = budget or Budget()
        self.config = config
        self.text_config = config.get_text_config()
        self.reader = reader
        self.device = device
        self.dtype = dtype
        self.model = empty_model(config, dtype, trust_remote_code)
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.layout = derive_layout(self.model, config, reader.keys())
        self.decoder = self.model.get_submodule(self.layout.decoder)
        self.blocks: nn.ModuleList = self.model.get_submodule(self.layout.blocks)
        self._blocks_attribute = self.layout.blocks.rpartition(".")[2]
        self.tied = tied_sources(self.model, config)

    def checkpoint_problems(self) -> list[str]:
        """Tensors the config implies that the checkpoint lacks or stores in another shape, and blocks
        beyond the config's layer count (they would be left out of any output)."""
        expected = expected_shapes(self.model, self.config, self.layout)
        return shape_problems(expected, self.reader.shapes) + blocks_beyond_config(self.reader.keys(), self.layout)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_keys(self, index: int) -> list[str]:
        return self.reader.keys_with_prefix(self.layout.block_prefix(index))

    def non_block_keys(self) -> list[str]:
        return [key for key in self.reader.keys() if not self.layout.is_block_key(key)]

    def _materialise(self, module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Loads `module`'s tensors (on the device, in the compute dtype); they must match its shapes."""
        expected = module.state_dict().keys()  # checkpoints may carry stale extras such as rotary inv_freq
        tensors = {k: t for k, t in tensors.items() if k in expected}
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise StreamPruneError(f"the checkpoint's {what} does not match the config: {detail[:300]}") from exc

    def _to_compute(self, key: str, tensor: torch.Tensor, reader: CheckpointReader) -> torch.Tensor:
        """A tensor `reader` read, on the device in the compute dtype; refused if its values overflow it."""
        check_fits(key, reader.magnitudes.get(key), self.dtype)
        return tensor.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def read_block(self, index: int, reader: CheckpointReader | None = None) -> dict[str, torch.Tensor]:
        """The block's tensors as stored (by `reader`, default the model's), read now into host memory
        (pinned when the device is CUDA)."""
        pin = self.device.type == "cuda"
        reader = reader or self.reader
        keys = reader.keys_with_prefix(self.layout.block_prefix(index))
        return {key: t.pin_memory() if pin else t.clone() for key, t in reader.iter_tensors(keys)}

    def load_block(self, index: int, reader: CheckpointReader | None = None, stored: dict | None = None) -> nn.Module:
        """Block `index` on the device in the compute dtype.

        Tensors are read and converted one at a time, so a block never sits in memory twice.  `reader`
        reads them from elsewhere than the model (a pruned block already written, on resume); `stored`
        gives them already read (read_block, in the background).
        """
        prefix = self.layout.block_prefix(index)
        reader = reader or self.reader
        source = stored.items() if stored is not None else reader.iter_tensors(reader.keys_with_prefix(prefix))
        tensors = {key[len(prefix) :]: self._to_compute(key, tensor, reader) for key, tensor in source}
        block = self.blocks[index]
        self._materialise(block, tensors, f"block {index}")
        return block

    def holds_exactly(self, key: str) -> bool:
        """Whether the compute dtype represents every value of this stored tensor exactly."""
        return torch.promote_types(self.reader.dtypes[key], self.dtype) == self.dtype

    def unload_block(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors back in the checkpoint's dtype on the CPU, its memory released tensor by tensor.

        Exact for the tensors for which holds_exactly() is true; the caller handles the others.
        """
        prefix = self.layout.block_prefix(index)
        block = self.blocks[index]
        stored = {}
        for name in list(block.state_dict().keys()):
            module_name, _, attribute = name.rpartition(".")
            module = block.get_submodule(module_name)
            key = prefix + name
            stored[key] = getattr(module, attribute).detach().to(device="cpu", dtype=self.reader.dtypes[key])
            if attribute in module._parameters:
                module._parameters[attribute] = nn.Parameter(module._parameters[attribute].to("meta"), requires_grad=False)
        _release(block)
        return_freed_memory()
        return stored

    def free_block(self, index: int) -> None:
        _release(self.blocks[index])
        return_freed_memory()

    def _stored_key(self, model_name: str) -> str:
        """The stored name a model tensor is read from (a tied tensor from its source)."""
        key = self.layout.stored_name(model_name)
        if key not in self.reader.shapes and model_name in self.tied:
            key = self.layout.stored_name(self.tied[model_name])
        return key

    def _load_own_tensors(self, path: str, module: nn.Module, placed: dict[str, nn.Parameter] | None = None) -> bool:
        """Reads the parameters of `module` itself (not its children's) if they are not loaded yet;
        True when it read any.  `placed` ({stored name: parameter}) holds what is already loaded under
        the same stored name, a tied LM head's embedding: it is reused, not read and placed again."""
        meta = [name for name, param in module.named_parameters(recurse=False) if param.device.type == "meta"]
        if not meta:
            return False
        keys = {name: self._stored_key(f"{path}.{name}" if path else name) for name in meta}
        placed = {} if placed is None else placed
        for name, key in list(keys.items()):
            if key in placed:
                module._parameters[name] = placed[key]
                del keys[name]
        missing = [key for key in keys.values() if key not in self.reader.shapes]
        if missing:
            raise StreamPruneError(f"tensor {missing[0]} is missing from the checkpoint")
        for name, key in keys.items():  # all checked before any is placed, so a refusal leaves nothing behind
            if tuple(self.reader.shapes[key]) != tuple(module._parameters[name].shape):
                raise StreamPruneError(f"tensor {key} has shape {list(self.reader.shapes[key])}; the config implies "
                                       f"{list(module._parameters[name].shape)}")
        read = dict(self.reader.iter_tensors(list(keys.values())))
        for name, key in keys.items():
            module._parameters[name] = placed[key] = nn.Parameter(self._to_compute(key, read[key], self.reader), requires_grad=False)
        return True

    def resident_outside_bytes(self) -> int:
        """Bytes, in the compute dtype, of the input embedding and the LM head (a tied head counted once
        with its embedding): what decoding() keeps on the device beside a block, which the placements of
        shared contexts and generation reserve room for (1 GiB each for Llama 3 8B in bfloat16)."""
        names = {module: name for name, module in self.model.named_modules()}
        modules = [m for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings()) if m is not None]
        keys = {self._stored_key(f"{names[m]}.weight") for m in modules}
        return self.dtype.itemsize * sum(torch.Size(self.reader.shapes[key]).numel() for key in keys if key in self.reader.shapes)

    @contextmanager
    def _outside_blocks(self, stubs: nn.ModuleList, embedding: nn.Module | None = None):
        """The model with every block replaced by `stubs` (and the input embedding by `embedding`, if
        given); any other module reads its tensors when the model's forward first calls it, and gives
        them back on exit."""
        blocks = self.blocks
        parent = self.model.get_submodule(self.layout.blocks.rpartition(".")[0])
        names = {module: name for name, module in self.model.named_modules()}
        loaded: list[nn.Module] = []

        placed: dict[str, nn.Parameter] = {}  # a tied head is its embedding's tensor, not a second copy

        def load(module, args, kwargs=None):
            if self._load_own_tensors(names[module], module, placed):
                loaded.append(module)

        inside = {module for module in blocks.modules()}
        original_embedding = self.model.get_input_embeddings()
        handles = []
        try:
            handles += [module.register_forward_pre_hook(load) for module in self.model.modules() if module not in inside]
            setattr(parent, self._blocks_attribute, stubs)
            if embedding is not None:
                self.model.set_input_embeddings(embedding)
            yield
        finally:
            setattr(parent, self._blocks_attribute, blocks)
            if embedding is not None:
                self.model.set_input_embeddings(original_embedding)
            for handle in handles:
                handle.remove()
            for module in loaded:
                for name, param in module.named_parameters(recurse=False):
                    module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
            return_freed_memory()

    def _stands(self) -> tuple[nn.ModuleList, dict]:
        """Stand-ins for every block and the state they share (see _Stand)."""
        state: dict = {"inject": None, "kwargs": {}}
        return nn.ModuleList(_Stand(i, state, last=i == self.num_blocks - 1) for i in range(self.num_blocks)), state

    def _logits_after_blocks(self, state: dict, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own forward on `hidden` (rows, positions, hidden_size) as the last block's output:
        its logits (rows, positions, vocab).  Inside _outside_blocks with _stands' stand-ins.

        Each position goes in as a row of its own, one position long: what follows the blocks works
        position by position, and the forward's own work before them (learned position embeddings,
        attention masks) then stays one position wide, however many positions are scored at once (OPT's
        position table ends at max_position_embeddings; a mask over a 16k-position chunk is 1 GiB)."""
        rows, positions = hidden.shape[:2]
        state["inject"] = hidden.reshape(rows * positions, 1, hidden.shape[-1])
        try:
            ids = torch.zeros((rows * positions, 1), dtype=torch.long, device=self.device)
            return self.model(input_ids=ids, use_cache=False).logits.reshape(rows, positions, -1)
        finally:
            state["inject"] = None

    @contextmanager
    def output_head(self):
        """Yields logits_of(hidden) -> logits, computed by the model's own forward after its last block.

        The model runs with its blocks replaced by stand-ins, the last of which returns the given hidden
        states (tokens, hidden_size), and its input embedding by zeros, so whatever the model does after
        the blocks (final norm, LM head, Gemma 2's final logit softcapping, Cohere's logit scale,
        Granite's logits scaling, OPT's projection) is transformers' code; what it reads is read once.
        """
        stands, state = self._stands()
        zeros = _ZeroEmbedding(self.model.get_input_embeddings().weight.shape[1], self.dtype, self.device)
        with self._outside_blocks(stands, zeros), torch.no_grad():
            yield lambda states: self._logits_after_blocks(state, states[None])[0]

    @contextmanager
    def decoding(self):
        """Yields (inputs, logits_of) for token-by-token decoding with a key/value cache per block.

        inputs(input_ids, **decoder_kwargs) runs the decoder's own forward (use_cache=True, masks from
        the attention_mask given, the cache passed as `cache`) with every block replaced by a recorder
        and returns block 0's inputs and each block's keyword arguments, the cache among them: calling
        block i with them fills or extends its entry of that cache.  logits_of(hidden) -> logits runs the
        model's own forward after its last block on hidden (rows, positions, hidden_size).  The
        embedding and the head stay resident until the context ends.
        """
        stands, state = self._stands()
        parameters = inspect.signature(self.decoder.forward).parameters
        cache_name = next((name for name in ("cache", "past_key_values") if name in parameters), None)
        with self._outside_blocks(stands), torch.no_grad():

            def inputs(input_ids: torch.Tensor, cache=None, **kwargs) -> tuple[torch.Tensor, dict[int, dict]]:
                state["kwargs"] = {}
                if cache is not None:
                    if cache_name is None:
                        raise StreamPruneError(f"{type(self.decoder).__name__} takes no cache argument; it cannot be decoded streamed")
                    kwargs[cache_name] = cache
                self.decoder(input_ids=input_ids.to(self.device), use_cache=True, **kwargs)
                return state["hidden"], state["kwargs"]

            yield inputs, partial(self._logits_after_blocks, state)

    @contextmanager
    def embedder(self):
        """Yields embed(input_ids, batch_size) -> Activations, with the embedding resident meanwhile.

        The decoder's own forward runs with every block replaced by a recorder, so block 0's inputs are
        the model's (embedding scale, learned positions, projections included), and every block's
        keyword arguments (masks, rotary embeddings) are those it builds.
        """
        stands, record = self._stands()
        with self._outside_blocks(stands):

            @torch.inference_mode()
            def embed(input_ids: torch.Tensor, batch_size: int, placement: str | None = None, reserve_bytes: int = 0,
                      pin: bool | None = None) -> Activations:
                rows, seqlen = input_ids.shape
                self.decoder(input_ids=input_ids[:1].to(self.device), use_cache=False)
                block_kwargs = dict(record["kwargs"])  # later calls record into the same dict
                shape = (rows, seqlen, record["hidden"].shape[-1])
                placement = placement or self.placement_for(torch.Size(shape).numel(), batch_size * seqlen, reserve_bytes)
                if pin is None:  # these states alone resident; a caller holding several decides for them all (pins)
                    pin = placement == "cpu" and self.pins([self.dtype.itemsize * torch.Size(shape).numel()])
                hidden = make_states(shape, self.dtype, self.device, placement, self.budget.offload_dir, pin=pin)
                for start in range(0, rows, batch_size):
                    self.decoder(input_ids=input_ids[start : start + batch_size].to(self.device), use_cache=False)
                    hidden.write(start, record["hidden"])
                return Activations(hidden, block_kwargs, placement)

            yield embed

    def embed(self, input_ids: torch.Tensor, batch_size: int, reserve_bytes: int = 0) -> Activations:
        """Inputs of block 0 for rows of equal length, and how every block is to be called on them;
        `reserve_bytes` more device memory is kept free for the block's work (statistics)."""
        with self.embedder() as embed:
            return embed(input_ids, batch_size, reserve_bytes=reserve_bytes)

    def placement_for(self, hidden_values: int, batch_tokens: int, reserve_bytes: int = 0) -> str:
        """Where `hidden_values` hidden-state entries go (all that are resident at once), given the budget
        and room for a block at work on `batch_tokens` tokens (one batch), plus `reserve_bytes`."""
        return self.placement_of_bytes(self.dtype.itemsize * hidden_values, batch_tokens, reserve_bytes)

    def placement_of_bytes(self, nbytes: int, batch_tokens: int, reserve_bytes: int = 0) -> str:
        """Where `nbytes` of tensors waiting between block visits go (placement.choose_placement), given
        the budget and room for a block at work on `batch_tokens` tokens (one batch), plus `reserve_bytes`."""
        itemsize = self.dtype.itemsize
        block_bytes = itemsize * sum(torch.Size(self.reader.shapes[k]).numel() for k in self.block_keys(0))
        activations = itemsize * batch_tokens * self.activation_values_per_token()
        return choose_placement(nbytes, 2 * block_bytes + activations + reserve_bytes, self.device, self.budget,
                                self.host_reserve_bytes())

    def pins(self, sizes: list[int]) -> bool:
        """Whether hidden states in host memory, tensors of `sizes` bytes resident at once, are pinned: on
        CUDA where their pinned allocations fit the host limit beside two pinned blocks
        (placement.pin_host_states); never on a CPU."""
        return self.device.type == "cuda" and pin_host_states(sizes, self.budget, self.host_reserve_bytes())

    def host_reserve_bytes(self) -> int:
        """Host memory, in bytes, that hidden states in host memory must leave for the blocks: on CUDA, two
        blocks' tensors as read_block pins them (the block at work and the next, read meanwhile), each
        tensor rounded up as PyTorch's pinned allocator rounds it (placement.pinned_bytes); 0 on a CPU,
        where the device's own reserve counts them."""
        if self.device.type != "cuda":
            return 0
        reader = self.reader
        return 2 * sum(pinned_bytes(reader.dtypes[k].itemsize * torch.Size(reader.shapes[k]).numel()) for k in self.block_keys(0))

    def activation_values_per_token(self) -> int:
        """Entries a block at work holds per token of its batch (4 x hidden size + 3 x intermediate size:
        the attention's and the MLP's activations), the measure the placements reserve room by."""
        hidden = self.text_config.hidden_size
        intermediate = getattr(self.text_config, "intermediate_size", None) or getattr(self.text_config, "ffn_dim", None) or 4 * hidden
        return 4 * hidden + 3 * intermediate

    def block_outputs(self, index: int, acts: Activations, rows: list[int], batch_size: int) -> torch.Tensor:
        """Block `index`'s outputs on the given rows of the hidden states, in batches, without changing
        them: (len(rows), seqlen, hidden) float32 on the compute device."""
        block = self.blocks[index]
        kwargs = acts.block_kwargs[index]
        outputs = []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = torch.cat([acts.hidden.read(row, row + 1) for row in rows[start : start + batch_size]])
                out = block(batch, **kwargs)
                outputs.append((out[0] if isinstance(out, tuple) else out).float())
        return torch.cat(outputs)

    def run_block(self, index: int, acts: Activations, batch_size: int, write_back: bool, trim: bool = True) -> None:
        """Calls block `index` on every row in batches; with write_back its outputs replace its inputs.

        A pass without write_back (the statistics pass) runs under no_grad rather than inference_mode,
        so that the tensors inside the block keep version counters: the statistics hooks need them to
        share the sums of a tensor fed to several linears (stats.py).  It costs nothing measurable.
        """
        block = self.blocks[index]
        kwargs = acts.block_kwargs[index]
        rows = acts.hidden.shape[0]
        out = None
        with torch.inference_mode() if write_back else torch.no_grad():
            for start in range(0, rows, batch_size):
                out = block(acts.hidden.read(start, min(start + batch_size, rows)), **kwargs)
                if isinstance(out, tuple):
                    out = out[0]
                if write_back:
                    acts.hidden.write(start, out)
        del out
        if trim:  # the activations' buffers, kept for reuse from batch to batch (callers with several
            return_freed_memory()  # Activations per block trim once, after the last: 1.7 ms a call)
