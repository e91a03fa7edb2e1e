"""StreamedLM: an lm-evaluation-harness model that streams a checkpoint one decoder block at a time.

    import lm_eval
    from streamprune.evaluate.harness import StreamedLM
    lm_eval.simple_evaluate(model=StreamedLM(pretrained="DIR", device="cpu"), tasks=["hellaswag"])

or, on the command line, `streamprune-lm-eval --model streamprune --model_args pretrained=DIR,device=cuda,dtype=auto
--tasks ...`: lm-eval's own command with this model registered (lm-eval 0.4.13, the current release, has
no way for an installed package to add a model to its `lm_eval` command; importing this module registers
it for `simple_evaluate(model="streamprune", ...)` and for that command).

The requests are those of lm-eval's Hugging Face backend (HFLM), answered the same way:
- tokenising: TemplateLM's context/continuation split, HFLM's tok_encode (its BOS rule, lm-eval's helpers);
- loglikelihood: the sum of the continuation's log-probabilities and whether each of its tokens is the
  argmax, from (context + continuation)[-(max_length + 1):];
- loglikelihood_rolling: lm-eval's own rolling windows (get_rolling_token_windows, make_disjoint_window);
- generate_until: greedy decoding or sampling (generation.generate), every request with the same generation
  arguments in each block visit, batch_size rows per forward call (longest contexts first, as HFLM),
  left-padded with HF generate's attention mask and position ids, one pass over the blocks per generated
  token with key/value caches placed as hidden states are; stop strings and max_gen_toks as the harness passes them
  (lm-eval's normalize_gen_kwargs, handle_stop_sequences and postprocess_generated_text), the EOS ids
  of the tokenizer and of the model's generation config, and of that config (generation_config.json,
  else config.json's generation settings, as transformers loads them) with the task's arguments as HFLM
  passes them to HF generate, the settings: repetition_penalty and no_repeat_ngram_size applied
  by transformers' own logits processors, the model's max_new_tokens over max_gen_toks; with do_sample,
  HF generate's sampling warpers (temperature, top_k, top_p, min_p, typical_p, epsilon and eta cutoffs,
  top_h) and a draw per token from each request's own generator (its seed: torch's seed, which lm-eval
  sets, and the request's task, document, index and repeat; _request_seeds); beam
  search and every other setting that would change the choices refused, not ignored;
- apply_chat_template: the tokenizer's chat template, as HFLM (lm-eval's --apply_chat_template).

Requires the optional extra: pip install 'streamprune[lmeval]'.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.generation import InfNanRemoveLogitsProcessor, LogitNormalization
from transformers.generation import GenerationMode

from ..checks import first_nonfinite, wider_dtypes
from ..errors import NumericalError, StreamPruneError

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix, resolve_max_length
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise StreamPruneError("lm-evaluation-harness is not installed; pip install 'streamprune[lmeval]'") from exc

from ..loading import open_model
from ..placement import Budget, parse_size
from .generation import generate
from .loglikelihood import Request, streamed_logprobs
from .work import Work, counting

log = logging.getLogger("streamprune")

DEFAULT_MAX_LENGTH = 2048  # HFLM's _DEFAULT_MAX_LENGTH
MAX_GEN_TOKS = 256  # HFLM's max_gen_toks
MAX_RESIDENT_TOKENS = 2**18  # streamprune eval's default --max-resident-tokens


@register_model("streamprune")
class StreamedLM(TemplateLM):
    """lm-eval's LM interface over a checkpoint streamed block by block (module docstring).

    Arguments (also as --model_args): pretrained (directory or hub id), device ('auto', 'cpu', 'cuda'),
    dtype ('auto', 'float32', 'bfloat16', 'float16', 'float64'), batch_size (rows per forward pass: of
    scored rows and shared contexts, batch_size of the longest and as many shorter ones as make the same
    number of tokens; of generations, batch_size rows; 'auto' is 4), max_length (tokens; default from the
    config as HFLM), add_bos_token (as HFLM), max_gpu_memory and max_host_memory (e.g. '4GiB': where the
    hidden states of scored requests and the key/value caches of generations may live; shared contexts
    are used only where theirs fit on the device), offload_dir (where what fits in neither goes; default:
    the system's temporary folder), trust_remote_code (off by default), share_contexts (default on: a
    context shared by several continuations, and a start shared by several prompts, such as the same
    few-shot examples before each question, run once per block, in scoring and in generation).
    Other arguments are refused.
    Raises StreamPruneError for a model streamprune cannot open.

    `work` (work.Work) adds up the token positions every call put through each block, against what its
    requests take read one by one; each call logs it (INFO, logger "streamprune"), and
    streamprune-lm-eval prints the total.
    """

    # the work of every backend lm-eval made from --model_args, in the order made (the counts only, not
    # the models, which lm-eval drops when done): streamprune-lm-eval prints those of its run
    works: list[Work] = []

    def __init__(self, pretrained: str | None = None, device: str = "auto", dtype: str = "auto", batch_size: int | str = 4,
                 max_length: int | None = None, add_bos_token: bool | None = None, max_gpu_memory: str | None = None,
                 max_host_memory: str | None = None, offload_dir: str | None = None, trust_remote_code: bool = False,
                 progress: bool = True, share_contexts: bool = True, max_batch_size: int | None = None, **unknown):
        super().__init__()
        if not pretrained:
            raise StreamPruneError("streamprune needs the model: pretrained=DIR in --model_args (a checkpoint folder or a hub id)")
        if unknown:
            raise _unknown_model_args(unknown)
        if offload_dir is not None and not Path(offload_dir).is_dir():
            raise StreamPruneError(f"offload_dir {offload_dir} is not a folder; make it or choose another")
        budget = Budget(max_gpu_bytes=parse_size(max_gpu_memory), max_cpu_bytes=parse_size(max_host_memory), offload_dir=offload_dir)
        flags = {name: _flag(name, value) for name, value in (("trust_remote_code", trust_remote_code), ("progress", progress),
                                                               ("share_contexts", share_contexts), ("add_bos_token", add_bos_token))}
        # HFLM gives add_bos_token to the tokenizer itself: one that adds no BOS by default then adds it
        tokenizer_options = {} if flags["add_bos_token"] is None else {"add_bos_token": flags["add_bos_token"]}
        opened = open_model(pretrained, device, dtype, flags["trust_remote_code"], budget, tokenizer_options)
        self._serve(opened, _rows_per_pass(batch_size), _whole("max_length", max_length), flags["add_bos_token"],
                    flags["progress"], flags["share_contexts"])
        StreamedLM.works.append(self.work)  # (from_opened's caller, streamprune eval, reads lm.work itself)

    def _serve(self, opened, batch_size: int, max_length: int | None, add_bos_token: bool | None, progress: bool,
               share_contexts: bool, max_resident_tokens: int = MAX_RESIDENT_TOKENS) -> None:
        """Takes the opened model and the settings, already parsed."""
        if opened.tokenizer is None:
            raise StreamPruneError(f"{opened.model_dir} has no tokenizer; lm-eval's tasks need one")
        self.stack, self.tokenizer = opened.stack, opened.tokenizer
        self.generation_config, self.generation_config_file = _generation_config(opened)
        self.stop_ids = _stop_ids(opened.tokenizer, self.generation_config)
        self._batch_size, self._max_length, self.add_bos_token = batch_size, max_length, add_bos_token
        self.progress, self.share_contexts, self.max_resident_tokens = progress, share_contexts, max_resident_tokens
        self._under_eval = False  # from_opened: streamprune eval's options, not --model_args, are the user's
        self.work = Work()  # every call's, added up: what sharing saved

    def _dtype_advice(self) -> str:
        """How the user asks for a dtype that does not overflow, in the command they ran."""
        advice = wider_dtypes(self.stack.dtype)
        return advice if self._under_eval else f"{advice.replace('--dtype ', 'dtype=')} in --model_args"

    def _max_length_advice(self) -> str:
        """How the user raises max_length, in the command they ran."""
        if self._under_eval:
            return (f"streamprune eval gives the model {self.max_length} tokens (its config's); streamprune-lm-eval "
                    f"takes a larger max_length in --model_args")
        return "raise max_length in --model_args"

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "StreamedLM":
        """As lm-eval's, except that --model_args win over the command's own options (device, batch_size),
        so `--model_args pretrained=DIR,device=cuda` works as HFLM users write it.  The command's --device
        cuda:N (lm-eval's default is cuda:0) on a machine without that GPU means 'auto', with a warning, as
        HFLM takes a device outside its list of available ones; a bare 'cuda', which HFLM keeps (and then
        fails on), and a CUDA device named in --model_args are refused when CUDA is not there."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        unknown = sorted(set(arg_dict) - (set(inspect.signature(cls.__init__).parameters) - {"self", "unknown"}))
        if unknown:  # before the device warning below, which a misspelt `device` would make misleading
            raise _unknown_model_args(unknown)
        if "device" in extra and _missing_cuda_device(extra["device"]):
            log.warning("lm-eval's --device %s is not on this machine; streamprune chooses the device itself (as lm-eval's HF "
                        "backend does); pass device=cpu or device=cuda in --model_args to choose", extra["device"])
            extra["device"] = "auto"
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "StreamedLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def from_opened(cls, opened, batch_size: int = 4, max_length: int | None = None, progress: bool = True,
                    max_resident_tokens: int = MAX_RESIDENT_TOKENS, share_contexts: bool = True) -> "StreamedLM":
        """The backend over a model streamprune has already opened (loading.open_model); max_resident_tokens
        (tokens whose hidden states or caches are kept at once: more go in rounds) and share_contexts as
        streamprune eval's."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._serve(opened, batch_size, max_length, None, progress, share_contexts, max_resident_tokens)
        lm._under_eval = True
        return lm

    # -- what the harness asks of a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.stack.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """Token ids as HFLM.tok_encode makes them (no special tokens unless add_bos_token, none again
        if the text already starts with the BOS string)."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text in the tokenizer's chat template (lm-eval's --apply_chat_template), as HFLM:
        continuing the last message when no generation prompt is asked for, and without the system
        message when the template refuses one."""
        import jinja2

        def render(history):
            return self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            return render([message for message in chat_history if message["role"] != "system"])

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's (its tokenising of each pair), its "Tokenizing inputs" bar off with progress=False."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax) per
        ((context, continuation), context_enc, continuation_enc), with HFLM's left truncation.  Raises
        NumericalError when one is not finite (HFLM would hand it on), StreamPruneError for a continuation
        of no tokens or of more than max_length (HFLM fails on both with a bare assertion)."""
        scored = []
        for pair, context_enc, continuation_enc in requests:
            if not continuation_enc:  # its log-likelihood would be 0: the likeliest answer of any
                said = f" {pair[1]!r} after {pair[0][-40:]!r}" if pair else ""
                raise StreamPruneError(f"the continuation{said} encodes to no tokens: lm-eval's split of context and "
                                       f"continuation gave its tokens to the context (as with a task's target_delimiter \"\" "
                                       f"before a word piece); give the task a target_delimiter such as \" \", or answers "
                                       f"that are not empty")
            if len(continuation_enc) > self.max_length:
                raise StreamPruneError(f"a continuation of {len(continuation_enc)} tokens does not fit max_length "
                                       f"{self.max_length} (the tokens the model is given at once); {self._max_length_advice()}")
            tokens = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
            scored.append(Request(tuple(tokens), len(tokens) - len(continuation_enc)))
        greedy: list = []
        done = Work.scored(scored)
        with counting(self.stack, done):
            logprobs = streamed_logprobs(self.stack, scored, batch_size=self._batch_size, max_resident_tokens=self.max_resident_tokens,
                                         progress=self.progress and not disable_tqdm, desc="lm-eval loglikelihood", greedy=greedy,
                                         share_contexts=self.share_contexts)
        self._worked("loglikelihood", done)
        bad = first_nonfinite(logprobs)
        if bad is not None:  # lm-eval would rank the answers by it all the same
            raise NumericalError(f"the log-likelihood of a request ({len(scored[bad].tokens)} tokens) is not finite: the activations "
                                 f"overflowed {str(self.stack.dtype).removeprefix('torch.')} or the model is damaged; evaluate "
                                 f"with {self._dtype_advice()}")
        results = [(float(lp.sum()), bool(g)) for lp, g in zip(logprobs, greedy)]
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def _worked(self, call: str, done: Work) -> None:
        self.work.add(done)
        log.info("lm-eval %s: %s", call, done.describe())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, over lm-eval's rolling windows of max_length tokens
        (each token predicted once, with as much context as fits), as HFLM."""
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for number, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[number] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations, greedy or sampled: requests with the same generation arguments, longest context
        first (as HFLM orders them), all of a group in each block visit, batch_size rows per forward call.
        Sampled requests draw from generators of their own (_request_seeds: torch's seed, which lm-eval
        sets, 1234 unless --seed says otherwise, and the request's task, document, index and repeat): the
        same text for the same seed whatever batch_size, the memory limits, share_contexts or the other
        tasks of the run, and HF generate's for that request alone after torch.manual_seed(its seed).
        HFLM draws a batch's rows from the global generator instead, so its samples, not their
        distribution, differ."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for number, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(number)
        results: list = [None] * len(requests)
        seeds_of = None
        for numbers in groups.values():
            given = dict(requests[numbers[0]].args[1])
            # lm-eval warns of sampling at temperature 0, which _generation_settings refuses just after, in a line of its own
            refused = given.get("do_sample") is True and not given.get("temperature")
            with _logger_quiet("lm_eval.models.utils") if refused else contextlib.nullcontext():
                kwargs = normalize_gen_kwargs(given, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            try:
                task_args = "the task's generation_kwargs" if self._under_eval else TASK_ARGS  # no --gen_kwargs there
                processor, new_tokens, sampled = _generation_settings(self.generation_config, self.generation_config_file, kwargs,
                                                                      task_args, self.stack.device)
            except StreamPruneError as exc:  # which task, among several
                names = ", ".join(sorted({requests[n].task_name for n in numbers if getattr(requests[n], "task_name", None)}))
                raise StreamPruneError(f"{exc} (lm-eval task {names})" if names else str(exc)) from None
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise StreamPruneError(f"{TASK_ARGS} ask for {max_gen_toks} new tokens, which leaves no room for a context "
                                       f"in max_length {self.max_length}; {self._max_length_advice()}")
            contexts = {n: self.tok_encode(requests[n].args[0], left_truncate_len=room) for n in numbers}
            empty = [n for n in numbers if not contexts[n]]
            if empty:  # HFLM generates from padding alone there; lm-eval's loglikelihood conditions on this token
                first = requests[empty[0]]
                log.warning("%d generation context(s) encode to no tokens (the first: task %s, document %s); they start from "
                            "the prefix token %d (BOS, else EOS), as lm-eval scores an empty context", len(empty),
                            getattr(first, "task_name", None), getattr(first, "doc_id", None), self.prefix_token_id)
                contexts.update({n: [self.prefix_token_id] for n in empty})
            ordered = sorted(numbers, key=lambda n: -len(contexts[n]))
            seeds = None
            if sampled:
                seeds_of = seeds_of or _request_seeds(requests, torch.initial_seed())
                seeds = [seeds_of[n] for n in ordered]
            # HF generate takes the model's own max_new_tokens over the max_length HFLM passes
            done = Work()
            with counting(self.stack, done):
                generated = generate(self.stack, [contexts[n] for n in ordered], max_gen_toks if new_tokens is None else new_tokens,
                                     self.tokenizer, until, self.stop_ids, progress=self.progress and not disable_tqdm,
                                     batch_size=self._batch_size, max_resident_tokens=self.max_resident_tokens,
                                     processor=processor, share_contexts=self.share_contexts, seeds=seeds)
            self._worked("generate_until", done.add(Work.generated([contexts[n] for n in ordered], generated)))
            for n, tokens in zip(ordered, generated):
                text = postprocess_generated_text(generation=self.tok_decode(tokens), stop=until, think_end_token=None)
                results[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return results


MODEL_ARGS = ("pretrained", "device", "dtype", "batch_size", "max_length", "add_bos_token", "max_gpu_memory",
              "max_host_memory", "offload_dir", "trust_remote_code", "progress", "share_contexts")


@contextlib.contextmanager
def _logger_quiet(name: str):
    """The logger `name` says nothing below ERROR inside the block (its level put back after)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _request_seeds(requests, seed: int) -> list[int]:
    """The seed each request of a generate_until call samples with: `seed` (torch.initial_seed(): what
    lm-eval's torch_random_seed, or torch.manual_seed, set) added to a 63-bit BLAKE2b hash of the
    request's task name, document id, index and repeat (lm-eval hands a task's `repeats` copies of a
    request one after another; the k-th draws with repeat k), modulo 2**63.  So a request's samples do
    not depend on the other requests of the run: another task beside it, or another --limit, leaves
    them as they were.  A request without a task and document (made by hand) is named by its position
    in the call instead."""
    seen: dict[tuple, int] = {}
    seeds = []
    for position, request in enumerate(requests):
        task, document = getattr(request, "task_name", None), getattr(request, "doc_id", None)
        key = (task, document, getattr(request, "idx", None)) if task is not None and document is not None else ("position", position)
        repeat = seen[key] = seen.get(key, -1) + 1
        digest = hashlib.blake2b(repr((*key, repeat)).encode(), digest_size=8).digest()
        seeds.append((seed + (int.from_bytes(digest, "little") >> 1)) % 2**63)
    return seeds


def _unknown_model_args(names) -> StreamPruneError:
    """The error for model arguments StreamedLM does not take (from --model_args or Python)."""
    return StreamPruneError(f"unknown --model_args {', '.join(sorted(names))} for streamprune; it takes {', '.join(MODEL_ARGS)}")


def _missing_cuda_device(name) -> bool:
    """Whether `name` is 'cuda:N' and this machine has no GPU N (HFLM's list of devices holds 'cuda' and
    'cpu' always, 'cuda:N' for the GPUs there are)."""
    try:
        device = torch.device(str(name))
    except RuntimeError:
        return False  # not a device name at all: choose_device says so
    if device.type != "cuda" or device.index is None:
        return False
    return not torch.cuda.is_available() or device.index >= torch.cuda.device_count()


TASK_ARGS = "the task's generation arguments (with --gen_kwargs)"  # lm-eval merges the command's into the task's


def _rows_per_pass(batch_size) -> int:
    """lm-eval's batch_size: a number, or 'auto'/'auto:N' (HFLM's search for the largest that fits, which
    streaming does not need: 4 rows, the CLI's default, are taken)."""
    if batch_size in (None, "") or str(batch_size).startswith("auto"):
        return 4
    try:
        rows = int(batch_size)
    except ValueError:
        raise StreamPruneError(f"batch_size must be a whole number or auto, not {batch_size!r}") from None
    if rows < 1:
        raise StreamPruneError("batch_size must be at least 1")
    return rows


def _generation_config(opened) -> tuple[GenerationConfig, str]:
    """The model's generation config as transformers gives a loaded model (GenerationMixin's loading in
    from_pretrained): generation_config.json, else the generation settings of config.json; and the
    name of the file it came from.  Raises StreamPruneError for one transformers refuses."""
    name, options = "generation_config.json", {}
    if not (opened.model_dir / name).is_file():  # config.json, which open_model has read, always is
        name, options = "config.json", {"config_file_name": "config.json", "_from_model_config": True}
    try:
        return GenerationConfig.from_pretrained(opened.model_dir, **options), name
    except ValueError as exc:
        raise StreamPruneError(f"{name} in {opened.model_dir} is not a valid generation config: {exc}") from None


def _stop_ids(tokenizer, generation_config: GenerationConfig) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the generation config's (a list in chat
    models: Gemma 3's <end_of_turn>, Llama 3's <|eot_id|>), as HF generate stops."""
    configured = generation_config.eos_token_id
    return ({tokenizer.eos_token_id} | set(configured if isinstance(configured, (list, tuple)) else [configured])) - {None}


# Settings of a generation config that change the choices and that streamed decoding does not apply,
# with the values that leave them off (transformers' GenerationMixin._get_logits_processor and
# generate: token_healing rewrites the prompt, stop_strings and max_time stop it otherwise)
NOT_APPLIED = {"guidance_scale": (None, 1, 1.0), "sequence_bias": (None,), "bad_words_ids": (None,), "min_length": (None, 0),
               "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
               "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
               "watermarking_config": (None,), "token_healing": (None, False), "stop_strings": (None,), "max_time": (None,)}

# The settings that ask for each decoding mode streamed generation has not (GenerationConfig.
# get_generation_mode), with the value that leaves each off
MODE_SETTINGS = {GenerationMode.BEAM_SEARCH: {"num_beams": 1}, GenerationMode.BEAM_SAMPLE: {"num_beams": 1},
                 GenerationMode.GROUP_BEAM_SEARCH: {"num_beams": 1, "num_beam_groups": 1},
                 GenerationMode.CONSTRAINED_BEAM_SEARCH: {"constraints": None, "force_words_ids": None, "num_beams": 1},
                 GenerationMode.CONTRASTIVE_SEARCH: {"penalty_alpha": None},
                 GenerationMode.ASSISTED_GENERATION: {"prompt_lookup_num_tokens": None, "assistant_early_exit": None, "use_mtp": False},
                 GenerationMode.DOLA_GENERATION: {"dola_layers": None}}


def _generation_settings(model_config: GenerationConfig, config_file: str, task_kwargs: dict, task_args: str = TASK_ARGS,
                         device: torch.device | str = "cpu") -> tuple[LogitsProcessorList, int | None, bool]:
    """What HF generate decodes with in HFLM: the task's generation arguments (lm-eval's
    normalize_gen_kwargs output, less until and max_gen_toks) over the model's generation config (from
    config_file) over transformers' global defaults (top_k 50, temperature 1.0, ...: GenerationMixin.
    _prepare_generation_config's order), the temperature set as HFLM's _model_generate sets it (0.0 if
    absent, dropped for greedy decoding).  Returns the logits processor (repetition_penalty and
    no_repeat_ngram_size as transformers' own processors, then when sampling HF generate's warpers,
    _sampling_warpers, on `device`), the model's own max_new_tokens if it sets one (HF generate takes it
    over the max_length HFLM passes) else None, and whether to sample (do_sample).  Raises
    StreamPruneError for an argument that is no generation setting (HF generate refuses it too), beam
    search and the other decoding modes (MODE_SETTINGS), a sampling task without a temperature and a
    sampling setting HF generate refuses (a temperature of 0), several sequences a request, and settings
    that change the choices and are not applied (NOT_APPLIED, a task's max_length), naming where each came
    from: a model's own repetition penalty (Qwen2.5-Instruct's 1.05) is applied, never ignored.
    remove_invalid_values and renormalize_logits are applied as HF generate applies them."""
    kwargs = dict(task_kwargs)
    if kwargs.get("do_sample") is True and "temperature" not in kwargs:
        # HFLM's _model_generate passes 0.0 then, over the model's own, and HF generate fails on it
        raise StreamPruneError(f"{task_args} ask for sampling (do_sample true) without a temperature; lm-eval's HF backend then "
                               "passes temperature 0.0, over the model's own, which HF generate refuses: give a temperature "
                               "above 0, or do_sample false for greedy decoding")
    kwargs.setdefault("temperature", 0.0)  # HFLM's _model_generate
    if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
        kwargs["do_sample"] = False
    if kwargs.get("do_sample") is False and kwargs["temperature"] == 0.0:
        kwargs.pop("temperature")
    unknown = sorted(name for name in kwargs if not hasattr(GenerationConfig(), name))
    if unknown:
        raise StreamPruneError(f"{', '.join(unknown)} in {task_args} {'is not a generation setting' if len(unknown) == 1 else 'are not generation settings'} "
                               f"(HF generate refuses them too)")
    if "max_length" in kwargs:
        raise StreamPruneError(f"{task_args} set max_length (context and new tokens, in HFLM as padded in "
                               "its batch); streamed generation takes max_gen_toks: set that instead")
    config = GenerationConfig()
    config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    try:
        config.update(**kwargs)
    except ValueError as exc:  # transformers' validation of the combination, as HF generate makes it
        raise StreamPruneError(f"{task_args} with the model's generation config ({config_file}) are refused by HF generate: "
                               f"{str(exc).strip()}") from None

    def source(name: str) -> str:
        return task_args if name in kwargs else f"the model's generation config ({config_file})"

    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        settings = {name: getattr(config, name, None) for name, off in MODE_SETTINGS.get(mode, {}).items()
                    if getattr(config, name, None) not in (off, None)}
        given = ", ".join(f"{name} {value!r}" for name, value in settings.items())
        fixes = " and ".join(f"set {name} {MODE_SETTINGS[mode][name]}" if MODE_SETTINGS[mode][name] not in (None, False)
                             else f"remove {name}" for name in settings) or "ask for no other decoding mode"
        where = " or ".join(dict.fromkeys(source(name) for name in settings)) or task_args
        raise StreamPruneError(f"streamed generation decodes greedily or samples, one sequence at a time; {task_args} with the "
                               f"model's generation config ask for {mode.value.replace('_', ' ')} (do_sample {config.do_sample}"
                               f"{', ' + given if given else ''}); {fixes} in {where}")
    if config.num_return_sequences not in (None, 1):
        raise StreamPruneError(f"{source('num_return_sequences')} set num_return_sequences = {config.num_return_sequences!r}; lm-eval reads "
                               "one sequence a request, and streamed generation makes one: set it to 1 (a task's repeats "
                               "draw several)")
    for name, off in NOT_APPLIED.items():
        if getattr(config, name, None) not in off:
            raise StreamPruneError(f"{source(name)} set {name} = {getattr(config, name)!r}, which streamed generation does not "
                                   f"apply; HF generate would, and its text would differ")
    processor = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1, 1.0):
        processor.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processor.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.remove_invalid_values:  # HF's place for it: after the penalties, before the warpers
        processor.append(InfNanRemoveLogitsProcessor())
    sampled = mode == GenerationMode.SAMPLE
    if sampled:
        processor.extend(_sampling_warpers(config, source, device))
    if config.renormalize_logits:  # always last in HF generate
        processor.append(LogitNormalization())
    return processor, config.max_new_tokens, sampled


def _sampling_warpers(config: GenerationConfig, source, device: torch.device | str = "cpu") -> list:
    """HF generate's sampling warpers for `config`, in its order (GenerationMixin._get_logits_processor's
    do_sample branch, one beam: min_tokens_to_keep 1), each made by transformers' own class.  `source`
    names where a setting came from, for the error.  Raises StreamPruneError for a value the warper
    refuses (a temperature of 0, a negative top_k or top_p), as HF generate raises ValueError."""
    from transformers import generation

    warpers = (  # (setting, whether its value applies a warper, the warper)
        ("temperature", lambda v: v != 1.0, lambda v: generation.TemperatureLogitsWarper(v)),
        ("top_h", lambda v: True, lambda v: generation.TopHLogitsWarper(top_h=v)),
        ("top_k", lambda v: v != 0, lambda v: generation.TopKLogitsWarper(top_k=v, min_tokens_to_keep=1)),
        ("top_p", lambda v: v < 1.0, lambda v: generation.TopPLogitsWarper(top_p=v, min_tokens_to_keep=1)),
        ("min_p", lambda v: True, lambda v: generation.MinPLogitsWarper(min_p=v, min_tokens_to_keep=1)),
        ("typical_p", lambda v: v < 1.0, lambda v: generation.TypicalLogitsWarper(mass=v, min_tokens_to_keep=1)),
        ("epsilon_cutoff", lambda v: 0.0 < v < 1.0, lambda v: generation.EpsilonLogitsWarper(epsilon=v, min_tokens_to_keep=1)),
        ("eta_cutoff", lambda v: 0.0 < v < 1.0, lambda v: generation.EtaLogitsWarper(epsilon=v, min_tokens_to_keep=1, device=device)),
    )
    made = []
    for name, applies, warper in warpers:
        value = getattr(config, name, None)
        if value is not None and applies(value):
            try:
                made.append(warper(value))
            except ValueError as exc:
                raise StreamPruneError(f"{source(name)} set {name} = {value!r}, which HF generate refuses for sampling: "
                                       f"{str(exc).strip()}") from None
    return made


def _flag(name: str, value) -> bool | None:
    """A yes/no model argument: --model_args gives strings ('True', 'false', '1', 'on'); None stays None.
    Anything else is refused: a typo must not turn a feature off."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise StreamPruneError(f"{name} must be true or false, not {value!r}")


def _whole(name: str, value) -> int | None:
    """A positive whole-number model argument (a string from --model_args), or None."""
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StreamPruneError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise StreamPruneError(f"{name} must be at least 1")
    return number
