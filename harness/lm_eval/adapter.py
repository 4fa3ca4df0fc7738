"""`KVBenchLM`: lm-evaluation-harness's HFLM with every request run through kvbench's compress-then-decode path.

Users already evaluate with lm-eval; this adapter lets any lm-eval task measure one compression method at one
budget. Importing this module registers it as lm-eval model `kvbench` (importing any `kvbench.harness` module
already registers it lazily, see `lm_eval_registration`), so

    lm_eval.simple_evaluate(model="kvbench", model_args="pretrained=smollm2-135m,method=snapkv,budget=0.25", ...)

works. Nothing here calls `model.generate`; requests run one at a time (batch size 1, as kvpress does).

**Context/question split.** A request's prompt is cut into a compressed part and an uncompressed rest:

- task-given: when the request's doc has a string field `context_field` (default `kvbench_context`, which
  kvbench's exported tasks carry) that occurs in the prompt, the prompt up to the end of its last occurrence
  is compressed and the rest (question, chat-turn suffix, answer prefix) follows the compressed cache. Both
  halves are tokenized without added special tokens, exactly as `kvbench run` tokenizes them.
- otherwise: the prompt is tokenized as HFLM tokenizes it, and all but its last `question_tokens` tokens
  (default 64: a final question window) are compressed; at least one token is always compressed.

**generate_until**: compress the first part, feed the rest, decode greedily until the generation config's EOS
ids, one of the request's `until` strings or `max_gen_toks`; like HFLM, prompts longer than `max_length -
max_gen_toks` lose their oldest context tokens. Sampling (`do_sample=True`) is refused: kvbench decodes
greedily. **loglikelihood**: the request's context is split the same way and compressed once per distinct
context; each continuation (every choice of a multiple-choice question) is then scored token by token after the
uncompressed rest, against the same compressed cache, and is "greedy" when every token is the argmax.
**loglikelihood_rolling** (HFLM's rolling windows) compresses each window's preceding tokens the same way; for
texts that fit one window that is only lm-eval's prefix token, so use kvbench's `perplexity` task to measure
perplexity after a compressed context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import transformers
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from kvbench.harness.artifacts.calibration import ensure_calibrated
from kvbench.harness.engine.pipeline import CellResult, iter_context_cells
from kvbench.harness.engine.scoring_cells import ScoredCell, iter_scoring_cells
from kvbench.harness.errors import BudgetError, KVBenchError
from kvbench.harness.models.loading import LoadedModel, load_model
from kvbench.harness.token_budget import budget_tokens, parse_budget
from kvbench.methods import Method, get_method

log = logging.getLogger(__name__)

DEFAULT_QUESTION_TOKENS = 64
DEFAULT_CONTEXT_FIELD = "kvbench_context"
REFUSAL_POLICIES = ("raise", "record")


@dataclass
class RequestRecord:
    """What one doc's requests cost and how they were split: the columns of a kvbench results row."""

    context_tokens: int
    question_tokens: int
    kv_bytes: int | None = None
    kv_bytes_full: int | None = None
    prefill_s: float | None = None
    compress_s: float | None = None
    decode_s: float = 0.0
    new_tokens: int = 0
    stopped_by: str | None = None
    kv_bytes_peak: int | None = None
    prefill_peak_memory_bytes: int | None = None
    decode_peak_memory_bytes: int | None = None
    error: str | None = None


def _as_loaded(pretrained: Any, tokenizer: Any, device: str | None, dtype: Any) -> LoadedModel:
    """A kvbench model from an alias/path/hub id (loaded once per process), a LoadedModel, or a model object."""
    if isinstance(pretrained, LoadedModel):
        return pretrained
    if isinstance(pretrained, str):
        device = "auto" if device in (None, "", "auto") else str(device)
        return load_model(pretrained, device, "auto" if dtype in (None, "auto") else str(dtype))
    if isinstance(pretrained, transformers.PreTrainedModel):
        if tokenizer is None or isinstance(tokenizer, str):
            raise KVBenchError("a model object needs its tokenizer object: KVBenchLM(pretrained=model, tokenizer=tok)")
        name = getattr(pretrained.config, "_name_or_path", "") or type(pretrained).__name__
        return LoadedModel(name, name, pretrained.eval(), tokenizer, pretrained.device, pretrained.dtype)
    raise KVBenchError(f"pretrained must be a model name, path or model object, not {type(pretrained).__name__}")


@register_model("kvbench")
class KVBenchLM(HFLM):
    """HFLM whose generate_until / loglikelihood run prefill → method.compress → KVBenchCache → decode or scoring.

    `records` maps (task name, doc id) to what that doc's requests cost (kv bytes, timings, split sizes);
    `kvbench lm-eval` turns them into result rows. `on_refusal="record"` answers a budget the method refuses
    with an empty output / -inf loglikelihood and records the refusal there instead of raising.
    """

    def __init__(
        self,
        pretrained: Any = "smollm2-135m",
        method: str = "full",
        budget: float | str = 1.0,
        question_tokens: int = DEFAULT_QUESTION_TOKENS,
        context_field: str = DEFAULT_CONTEXT_FIELD,
        on_refusal: str = "raise",
        tokenizer: Any = None,
        device: str | None = None,
        dtype: Any = "auto",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        self.method = method if isinstance(method, Method) else get_method(str(method))
        self.budget = parse_budget(budget) if self.method.uses_budget else 1.0  # a fraction, or `256t`
        if int(question_tokens) < 0:
            raise KVBenchError(f"question_tokens {question_tokens} must be 0 or more")
        if on_refusal not in REFUSAL_POLICIES:
            raise KVBenchError(f"on_refusal {on_refusal!r} is not one of {', '.join(REFUSAL_POLICIES)}")
        self.question_tokens = int(question_tokens)
        self.context_field = context_field
        self.on_refusal = on_refusal
        self.loaded = _as_loaded(pretrained, tokenizer, device, dtype)
        ensure_calibrated(self.loaded, self.method)
        super().__init__(pretrained=self.loaded.model, tokenizer=self.loaded.tokenizer, batch_size=batch_size, **kwargs)
        self.records: dict[tuple[str | None, int | None], RequestRecord] = {}

    def get_model_info(self) -> dict:
        """What lm-eval records about the model; HFLM's version asks the hub for a commit hash."""
        return {
            "model": self.loaded.name,
            "model_source": self.loaded.source,
            "model_dtype": str(self.loaded.dtype).removeprefix("torch."),
            "model_num_parameters": sum(p.numel() for p in self.loaded.model.parameters()),
            "kvbench_method": self.method.label,
            "kvbench_method_config": self.method.config_record(),
            "kvbench_budget": float(self.budget),
            "kvbench_budget_tokens": budget_tokens(self.budget),  # None for a fraction
            "kvbench_question_tokens": self.question_tokens,
        }

    # --- splitting -------------------------------------------------------------------------------------------

    def split(self, prompt: str, doc: dict | None) -> tuple[list[int], list[int]]:
        """(ids to compress, ids fed after the compressed cache) for a generation prompt; see the module docstring."""
        given = self.task_split(prompt, doc)
        if given is not None:
            return given
        return self.split_ids(self.tok_encode(prompt) if prompt else [self.prefix_token_id])

    def task_split(self, prompt: str, doc: dict | None) -> tuple[list[int], list[int]] | None:
        """The split at the end of the doc's `context_field` text, when the doc has one and the prompt holds it."""
        marker = doc.get(self.context_field) if isinstance(doc, dict) else None
        if not (isinstance(marker, str) and marker and marker in prompt):
            return None
        cut = prompt.rindex(marker) + len(marker)
        encode = self.tokenizer.encode
        return list(encode(prompt[:cut], add_special_tokens=False)), list(
            encode(prompt[cut:], add_special_tokens=False)
        )

    def split_ids(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """All but the last `question_tokens` ids are compressed, and at least the first one."""
        cut = max(1, len(ids) - self.question_tokens)
        return list(ids[:cut]), list(ids[cut:])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """TemplateLM's tokenization of a loglikelihood request; an empty context becomes the prefix token."""
        if context:
            return self._encode_pair(context, continuation)
        ids = self.tok_encode(continuation, add_special_tokens=False)
        if ids[0] != self.prefix_token_id:
            return [self.prefix_token_id], ids
        return ids[:1], ids[1:]

    # --- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvbench generate_until"):
            prompt, gen_kwargs = request.args
            outputs.append(self._generate(request, prompt, dict(gen_kwargs)))
        return outputs

    def _generate(self, request: Instance, prompt: str, gen_kwargs: dict) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs.get("do_sample"):
            raise KVBenchError(
                f"task {request.task_name} asks for sampling (do_sample=True); kvbench decodes greedily only"
            )
        until = list(kwargs["until"])
        max_gen_toks = int(kwargs["max_gen_toks"])
        context_ids, question_ids = self.split(prompt, request.doc)
        overflow = len(context_ids) + len(question_ids) + max_gen_toks - self.max_length
        if overflow > 0:
            log.warning("kvbench: prompt exceeds max_length - max_gen_toks; dropping its first %d tokens", overflow)
            context_ids = context_ids[overflow:] or context_ids[-1:]
        record = RequestRecord(len(context_ids), len(question_ids))
        self.records[(request.task_name, request.doc_id)] = record
        ((_, _, outcome),) = iter_context_cells(
            self.loaded, context_ids, question_ids, [(self.method, self.budget)], max_gen_toks, until
        )
        if isinstance(outcome, BudgetError):
            return self._refuse(record, outcome, "")
        _fill(record, outcome)
        record.decode_s = outcome.decode_s
        record.new_tokens = outcome.new_tokens
        record.stopped_by = outcome.stopped_by
        return outcome.output

    def _refuse(self, record: RequestRecord, refusal: BudgetError, answer: Any) -> Any:
        if self.on_refusal == "raise":
            raise refusal
        record.error = str(refusal)
        return answer

    # --- loglikelihood ---------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Group requests by (doc, context): one compression per context, every continuation scored against it."""
        groups: dict[tuple, list[int]] = {}
        splits: dict[tuple, tuple[list[int], list[int]]] = {}
        continuations: list[list[int]] = []
        for index, request in enumerate(requests):
            context, continuation = request.args
            context_ids, continuation_ids = self._pair(context, continuation)
            continuations.append(list(continuation_ids))
            key = (request.task_name, request.doc_id, context)
            if key not in splits:
                # _encode_pair moves the context's trailing spaces into the continuation; the split does too.
                given = self.task_split(context.rstrip(), request.doc)
                splits[key] = given if given is not None else self.split_ids(context_ids)
            groups.setdefault(key, []).append(index)
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for key, indices in tqdm(groups.items(), disable=disable_tqdm or self.rank != 0, desc="kvbench loglikelihood"):
            task_name, doc_id, _ = key
            context_ids, question_ids = splits[key]
            record = self.records.setdefault((task_name, doc_id), RequestRecord(len(context_ids), len(question_ids)))
            scored = self._score(context_ids, question_ids, [continuations[i] for i in indices], record)
            for index, answer in zip(indices, scored):
                answers[index] = answer
        return answers

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, override_bs: Any = None
    ) -> list[tuple[float, bool]]:
        """Token-level requests (HFLM's rolling windows): the window split on each request's context ids."""
        answers = []
        for _, context_ids, continuation_ids in tqdm(requests, disable=disable_tqdm or self.rank != 0):
            compressed, rest = self.split_ids(context_ids)
            record = RequestRecord(len(compressed), len(rest))
            answers.extend(self._score(compressed, rest, [list(continuation_ids)], record))
        return answers

    def _score(
        self, context_ids: list[int], question_ids: list[int], continuations: list[list[int]], record: RequestRecord
    ) -> list[tuple[float, bool]]:
        ((_, _, outcome),) = iter_scoring_cells(
            self.loaded, context_ids, question_ids, continuations, [(self.method, self.budget)]
        )
        if isinstance(outcome, BudgetError):
            return self._refuse(record, outcome, [(float("-inf"), False)] * len(continuations))
        _fill(record, outcome)
        record.decode_s += outcome.score_s
        return [(score.total, score.greedy) for score in outcome.scores]


def _fill(record: RequestRecord, outcome: CellResult | ScoredCell) -> None:
    record.kv_bytes = outcome.kv_bytes
    record.kv_bytes_full = outcome.kv_bytes_full
    record.prefill_s = outcome.prefill_s
    record.compress_s = outcome.compress_s
    record.kv_bytes_peak = max(record.kv_bytes_peak or 0, outcome.kv_bytes_peak)
    record.prefill_peak_memory_bytes = outcome.prefill_peak_memory_bytes
    record.decode_peak_memory_bytes = outcome.decode_peak_memory_bytes
