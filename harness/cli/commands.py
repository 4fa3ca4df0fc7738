"""The `kvbench` command line. User errors end here as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from kvbench.harness.cli.fast_checks import check_arguments, read_prompt
from kvbench.harness.engine.batched_settings import DEFAULT_BATCH_SIZE
from kvbench.harness.errors import KVBenchError
from kvbench.harness.runner.ray_runner import CONNECT_TIMEOUT_S
from kvbench.harness.token_budget import budget_label, budget_tokens, for_context, parse_budget

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise KVBenchError(f"{message} (see '{self.prog} --help')")


def _seconds(text: str) -> float:
    """argparse type of a timeout, which only a number of seconds above 0 can be."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="embedded alias, Hugging Face id, model dir or .gguf file"
    )
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda (auto picks CUDA when present)")
    parser.add_argument(
        "--dtype", default="auto", help="auto|float32|bfloat16|float16 (auto: bf16 on CUDA, fp32 on CPU)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvbench", description="Benchmark KV-cache compression methods on one cache API.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    listing = commands.add_parser("list", help="list registered methods or tasks")
    listing.add_argument("what", choices=["methods", "tasks"])
    listing.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="local data-set copies")

    data = commands.add_parser("data", help="standard data sets: `kvbench data fetch TASK` writes a local copy")
    data.add_argument("action", choices=["fetch"])
    data.add_argument("names", help="comma-separated data-set tasks, e.g. longbench:hotpotqa,longbench_v2")
    data.add_argument("--length", type=int, help="ruler only: the length config of kvpress's copy (simonjegou/ruler)")

    run = commands.add_parser("run", help="sweep tasks x lengths x methods x budgets into a result store and report")
    _add_model_options(run)
    run.add_argument("--methods", required=True, help="comma-separated methods, e.g. full,snapkv,streaming_llm")
    run.add_argument(
        "--budgets",
        required=True,
        help="comma-separated budgets: fractions in (0, 1] and/or tokens per KV head, e.g. 0.1,0.25,256t",
    )
    run.add_argument("--tasks", required=True, help="comma-separated tasks (kvbench list tasks)")
    run.add_argument(
        "--lengths",
        help="comma-separated prompt lengths in tokens, generation included; for data sets an optional cap "
        "(default: each sample's own length, capped at the model's window)",
    )
    run.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a data set's local copy (file or directory in its schema), e.g. longbench=/data/longbench (repeatable)",
    )
    run.add_argument(
        "--over-length",
        choices=["truncate", "skip"],
        default="truncate",
        help="a data-set sample over the length cap: truncate its context's middle (LongBench) or skip it (counted)",
    )
    run.add_argument("--samples", type=int, default=5, help="samples per task and length")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--out", required=True, help="run directory: results.jsonl, run.json, report.md, report.html")
    run.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    run.add_argument("--force", action="store_true", help="replace results of another model/seed/setting in --out")
    run.add_argument("--no-report", action="store_true", help="skip rendering the report at the end")
    run.add_argument(
        "--length-bins",
        metavar="EDGES",
        help="report data-set rows by the bin of their samples' own lengths (sample_tokens) instead of the length "
        "cap: edges in tokens, k = 1024, e.g. 0,4k,8k,16k,32k (inf: an open last bin); a bin is (lo, hi]",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"cells of one sample decoded together in one batch (1: each alone; default {DEFAULT_BATCH_SIZE})",
    )
    run.add_argument(
        "--workers", type=int, help="spread the samples over N Ray actors (local Ray; 1: in this process, the default)"
    )
    run.add_argument(
        "--ray-address", help="run the actors on an existing Ray cluster (ray start --head), e.g. HOST:6379"
    )
    run.add_argument(
        "--ray-timeout",
        type=_seconds,
        default=CONNECT_TIMEOUT_S,
        help=f"seconds the --ray-address may take to answer before the run stops (default {CONNECT_TIMEOUT_S:g})",
    )

    lm_eval = commands.add_parser(
        "lm-eval", help="run lm-eval tasks through KVBenchLM for every method and budget into a result store"
    )
    _add_model_options(lm_eval)
    lm_eval.add_argument("--methods", required=True, help="comma-separated methods, e.g. full,snapkv,streaming_llm")
    lm_eval.add_argument(
        "--budgets",
        required=True,
        help="comma-separated budgets: fractions in (0, 1] and/or tokens per KV head, e.g. 0.25,256t",
    )
    lm_eval.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lm_eval.add_argument(
        "--include-path", action="append", default=[], help="directory of task YAMLs (repeatable), e.g. an export"
    )
    lm_eval.add_argument("--limit", type=int, help="first N docs of each task")
    lm_eval.add_argument("--out", required=True, help="run directory: results.jsonl, run.json, report.md, report.html")
    lm_eval.add_argument(
        "--question-tokens",
        type=int,
        default=64,
        help="tokens left uncompressed at the end of a prompt whose doc gives no kvbench_context split",
    )
    lm_eval.add_argument("--apply-chat-template", action="store_true", help="let lm-eval apply the chat template")
    lm_eval.add_argument("--seed", type=int, default=42)
    lm_eval.add_argument("--force", action="store_true", help="replace results of another model/seed in --out")
    lm_eval.add_argument("--no-report", action="store_true", help="skip rendering the report at the end")
    lm_eval.add_argument("--no-progress", action="store_true", help="no progress bar")

    export = commands.add_parser(
        "export-lm-eval", help="write kvbench tasks as lm-eval YAML + JSONL tasks for one model's tokenizer"
    )
    _add_model_options(export)
    export.add_argument("--tasks", required=True, help="comma-separated kvbench tasks (kvbench list tasks)")
    export.add_argument("--lengths", required=True, help="comma-separated prompt lengths in tokens")
    export.add_argument("--samples", type=int, default=5, help="samples per task and length")
    export.add_argument("--seed", type=int, default=42)
    export.add_argument("--out", required=True, help="directory for the YAML, JSONL and utils.py files")

    calibrate = commands.add_parser("calibrate", help="compute and cache a method's calibration artifacts")
    calibrate.add_argument("method", help="a method that needs calibration")
    _add_model_options(calibrate)
    calibrate.add_argument("--force", action="store_true", help="recompute even if cached")

    train = commands.add_parser(
        "train",
        help="train a learned method into a checkpoint file, or fine-tune a model for attention_clustering",
        description="Learned methods take their config fields as options (e.g. kvbench train autoencoder "
        "--latent-dim 16 --out ae.pt); attention_clustering takes --steps --length --batch --lr --max-cache "
        "--clusters --seed and writes a model directory.",
    )
    train.add_argument("method", help="a learned method, or attention_clustering")
    _add_model_options(train)
    train.add_argument("--out", required=True, help="checkpoint file (learned methods) or model directory")

    report = commands.add_parser("report", help="render report.md and report.html from a run directory")
    report.add_argument("run_dir")
    report.add_argument(
        "--length-bins",
        metavar="EDGES",
        help="report data-set rows by the bin of their samples' own lengths (sample_tokens) instead of the length "
        "cap: edges in tokens, k = 1024, e.g. 0,4k,8k,16k,32k (inf: an open last bin); a bin is (lo, hi]",
    )

    compare = commands.add_parser(
        "compare",
        help="paired differences between two configurations of a run (A - B on the same samples, with intervals)",
        description="Prints Markdown tables: per task and over all tasks, each budget's A and B means and A - B "
        "paired by sample, with 95%% bootstrap intervals. Labels are the method labels of the store's rows "
        "(as given to --methods); a configuration stored at one budget only (full) is compared with every budget.",
    )
    compare.add_argument("run_dir")
    compare.add_argument(
        "--pair", nargs=2, action="append", required=True, metavar=("A", "B"), help="compare A with B (repeatable)"
    )
    compare.add_argument(
        "--length-bins",
        metavar="EDGES",
        help="compare by the bin of the samples' own lengths, as `kvbench report --length-bins` (e.g. 0,4k,8k)",
    )

    generate = commands.add_parser(
        "generate", help="compress one prompt, answer it, print output, kv bytes and timings"
    )
    _add_model_options(generate)
    generate.add_argument(
        "--method", help="a registered method (kvbench list methods); with --load-cache, the stored one"
    )
    generate.add_argument(
        "--budget",
        help="fraction of the full context cache's bytes to keep, in (0, 1], or tokens per KV head (256t); with "
        "--load-cache, the stored one",
    )
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the context text (compressed)")
    source.add_argument("--prompt-file", help="file holding the context text (compressed)")
    source.add_argument(
        "--load-cache", metavar="FILE", help="answer --question from a stored context (no prompt, no prefill)"
    )
    generate.add_argument(
        "--save-cache", metavar="FILE", help="also write the compressed context to FILE (answer it later: --load-cache)"
    )
    generate.add_argument("--question", default="", help="text after the context, not compressed")
    generate.add_argument("--answer-prefix", default="", help="text that starts the answer (after the chat turn)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _cmd_list(args: argparse.Namespace) -> None:
    if args.what == "methods":
        from kvbench.methods import list_methods, method_origin

        rows = [(name, family, method_origin(name), description) for name, family, description in list_methods()]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        for row in rows:
            print("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) + f"  {row[3]}")
        return
    from kvbench.tasks import list_dataset_tasks, list_tasks
    from kvbench.tasks.datasets.catalog import parse_data_paths

    rows = [(name, description) for name, description in list_tasks()]
    datasets = list_dataset_tasks(parse_data_paths(args.data))
    width = max(len(row[0]) for row in [*rows, *datasets])
    for row in rows:
        print(f"{row[0]:<{width}}  " + "  ".join(row[1:]))
    print("\ndata sets (present: local copy found; absent: `kvbench data fetch TASK`, or the Hugging Face cache):")
    for name, description, where in datasets:
        print(
            f"{name:<{width}}  {'present' if where else 'absent ':<7}  {description}"
            + (f"  [{where}]" if where else "")
        )


def _cmd_data(args: argparse.Namespace) -> None:
    from kvbench.tasks.datasets.fetch import fetch

    for name in args.names.split(","):
        print(f"{name}: {fetch(name.strip(), args.length)}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from kvbench.harness.models.loading import load_model, resolve_device, resolve_dtype
    from kvbench.methods import get_method

    if args.max_new_tokens < 1:
        raise KVBenchError("--max-new-tokens must be at least 1")
    if args.load_cache is not None:
        _generate_from_stored(args)
        return
    method = get_method(args.method)
    budget = parse_budget(args.budget)
    prompt = read_prompt(args)
    resolve_dtype(args.dtype, resolve_device(args.device))

    from kvbench.harness.artifacts.calibration import ensure_calibrated
    from kvbench.harness.engine.pipeline import run_context
    from kvbench.tasks.prompting import split_prompt

    loaded = load_model(args.model, args.device, args.dtype)
    ensure_calibrated(loaded, method)
    question = f"\n{args.question}" if args.question else ""
    parts = split_prompt(loaded.tokenizer, prompt, question, args.answer_prefix)
    total = len(parts.context_ids) + len(parts.question_ids) + args.max_new_tokens
    if total > loaded.max_length:
        raise KVBenchError(
            f"prompt of {len(parts.context_ids) + len(parts.question_ids)} tokens plus {args.max_new_tokens} new tokens "
            f"exceeds {args.model}'s maximum length of {loaded.max_length} tokens"
        )
    if args.save_cache is None:
        (result,) = run_context(loaded, parts.context_ids, parts.question_ids, [(method, budget)], args.max_new_tokens)
        _print_generation(args, loaded, result, len(parts.context_ids), len(parts.question_ids))
        return
    from kvbench.harness.engine import stored_context
    from kvbench.harness.engine.pipeline import CellResult, compress_context

    # a token budget is stored as what it is on this context (the fraction its tokens take), as rows record it
    effective = for_context(budget, len(parts.context_ids)) if method.uses_budget else 1.0
    compressed = compress_context(loaded, None, method, effective, parts.context_ids)
    size = stored_context.save_context(
        args.save_cache,
        compressed.cache,
        compressed.last_logits,
        stored_context.identity(loaded, method, effective),
        compressed.kv_bytes_full,
    )
    done = stored_context.answer(
        loaded, method, compressed.cache, compressed.last_logits, parts.question_ids, args.max_new_tokens
    )
    result = _cell_result(CellResult, method, effective, done, compressed.kv_bytes_full)
    result.prefill_s, result.compress_s = compressed.prefill_s, compressed.compress_s
    result.prefill_peak_memory_bytes = compressed.prefill_peak_memory_bytes
    extra = {"saved_cache": str(args.save_cache), "stored_file_bytes": size}
    _print_generation(args, loaded, result, len(parts.context_ids), len(parts.question_ids), extra)


def _cell_result(cell_type, method, budget: float, done, kv_bytes_full: int):
    generation = done.generation
    return cell_type(
        method=method.name,
        budget=budget,
        output=generation.text,
        token_ids=generation.token_ids,
        new_tokens=len(generation.token_ids),
        stopped_by=generation.stopped_by,
        kv_bytes=done.kv_bytes,
        kv_bytes_full=kv_bytes_full,
        prefill_s=0.0,
        compress_s=0.0,
        decode_s=done.decode_s,
        kv_bytes_peak=done.kv_bytes_peak,
        decode_peak_memory_bytes=done.decode_peak_memory_bytes,
    )


def _generate_from_stored(args: argparse.Namespace) -> None:
    """Answer --question from a stored context: its identity checked first, then its cache rebuilt, no prefill."""
    from kvbench.harness.engine import stored_context
    from kvbench.harness.engine.pipeline import CellResult, full_kv_bytes
    from kvbench.harness.models.loading import load_model, resolve_device, resolve_dtype
    from kvbench.methods import get_method
    from kvbench.tasks.prompting import split_prompt

    stored = stored_context.read_context(args.load_cache)
    where = args.load_cache
    method = get_method(stored["method"] if args.method is None else args.method)
    asks = f"this kvbench builds {method.label} as" if args.method is None else "--method asks for"
    stored_context.refuse_other_method(where, stored, method.label, method.config_record(), asks)
    if args.budget is not None and method.uses_budget and parse_budget(args.budget) != stored["budget"]:
        raise KVBenchError(f"--load-cache {where} was compressed at budget {stored['budget']:g}, not {args.budget}")
    dtype = stored["dtype"] if args.dtype == "auto" else args.dtype
    resolve_dtype(dtype, resolve_device(args.device))
    loaded = load_model(args.model, args.device, dtype)
    question = f"\n{args.question}" if args.question else ""
    question_ids = split_prompt(loaded.tokenizer, "", question, args.answer_prefix).question_ids
    context = int(stored["context_length"])
    if context + len(question_ids) + args.max_new_tokens > loaded.max_length:
        raise KVBenchError(
            f"stored context of {context} tokens plus {len(question_ids)} question tokens and {args.max_new_tokens} "
            f"new tokens exceeds {args.model}'s maximum length of {loaded.max_length} tokens"
        )
    cache, logits, load_s = stored_context.load_stored(stored, loaded, method)
    done = stored_context.answer(loaded, method, cache, logits, question_ids, args.max_new_tokens)
    full = stored.payload.get("kv_bytes_full") or full_kv_bytes(loaded.model.config, context, loaded.dtype)
    result = _cell_result(CellResult, method, stored["budget"], done, full)
    extra = {"loaded_cache": str(where), "load_s": round(load_s, 4)}
    _print_generation(args, loaded, result, context, len(question_ids), extra)


def _print_generation(args, loaded, result, context_tokens: int, question_tokens: int, extra=None) -> None:
    record = {
        "model": args.model,
        "method": result.method,
        "budget": float(result.budget),
        **({"budget_tokens": budget_tokens(result.budget)} if budget_tokens(result.budget) else {}),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "context_tokens": context_tokens,
        "question_tokens": question_tokens,
        "output": result.output,
        "new_tokens": result.new_tokens,
        "kv_bytes": result.kv_bytes,
        "kv_bytes_full": result.kv_bytes_full,
        "kv_ratio": round(result.kv_ratio, 6),
        "prefill_s": round(result.prefill_s, 4),
        "compress_s": round(result.compress_s, 4),
        "decode_s": round(result.decode_s, 4),
        "decode_ms_per_token": round(1000 * result.decode_s / max(result.new_tokens, 1), 2),
        "kv_bytes_peak": result.kv_bytes_peak,
        "prefill_peak_memory_bytes": result.prefill_peak_memory_bytes,
        "decode_peak_memory_bytes": result.decode_peak_memory_bytes,
        **(extra or {}),
    }
    if args.json:
        print(json.dumps(record, ensure_ascii=False))
        return
    print(result.output)
    stored = ""
    if "saved_cache" in record:
        stored = f" | saved {record['saved_cache']} ({record['stored_file_bytes']:,} bytes)"
    elif "loaded_cache" in record:
        stored = f" | loaded {record['loaded_cache']} in {record['load_s']:.3f} s, no prefill"
    print(
        f"\n[{result.method} @ {budget_label(result.budget)}] kv_bytes {result.kv_bytes:,} of {result.kv_bytes_full:,} "
        f"({result.kv_ratio:.3f}) | {context_tokens} context tokens | prefill {result.prefill_s:.2f} s | "
        f"compress {result.compress_s:.3f} s | decode {result.decode_s:.2f} s for {result.new_tokens} tokens "
        f"({record['decode_ms_per_token']} ms/token){stored}",
        file=sys.stderr,
    )


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.ray_address or args.workers not in (None, 1):
        from kvbench.harness.runner.ray_runner import check_cluster, check_workers, require_ray

        check_workers(args.workers)
        require_ray()
        check_cluster(args.ray_address, args.ray_timeout)  # before the model loads
    from kvbench.harness.runner.lists import parse_budgets, parse_lengths, parse_list, split_list
    from kvbench.harness.runner.sweep import SweepSpec, run_sweep
    from kvbench.tasks.datasets.catalog import parse_data_paths

    spec = SweepSpec(
        model=args.model,
        methods=split_list(args.methods, "methods"),  # repeats are merged by configuration once the methods are built
        budgets=parse_budgets(args.budgets, tokens=True),
        tasks=parse_list(args.tasks, "tasks"),
        lengths=parse_lengths(args.lengths) if args.lengths is not None else [],
        samples=args.samples,
        data=parse_data_paths(args.data),
        over_length=args.over_length,
        out=Path(args.out),
        seed=args.seed,
        query_aware=args.query_aware,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        batch_size=args.batch_size,
        command=shlex.join(["kvbench", *argv]),
        workers=args.workers if args.ray_address else (args.workers or 1),
        ray_address=args.ray_address,
        ray_timeout=args.ray_timeout,
    )
    store = run_sweep(spec, progress=not args.no_progress)
    print(f"results: {store.results_path}")
    _finish_run(store.directory, render=not args.no_report, length_bins=_length_bins(args))


def _length_bins(args: argparse.Namespace) -> tuple[float, ...] | None:
    from kvbench.harness.cli.length_bins import parse_length_bins

    return parse_length_bins(args.length_bins) if args.length_bins is not None else None


def _finish_run(run_dir: Path, render: bool, length_bins: tuple[float, ...] | None = None) -> None:
    """Render the report (unless --no-report), then print its summary table and, last, where the report is.

    The table comes from the store through the report's own tables, so it is printed with --no-report too
    (where a store the report could not read is said in one line instead of failing the finished run).
    """
    from kvbench.reports import ReportError, render_report
    from kvbench.reports.terminal import summary_text

    try:
        run = _read_run(run_dir)
        paths = render_report(run, length_bins) if render else ()
        table = summary_text(run, length_bins)
    except ReportError as error:
        if render:
            raise KVBenchError(str(error)) from None
        paths, table = (), f"summary: {error}"
    print(table)
    for path in paths:
        print(f"report: {path}")


def _cmd_lm_eval(args: argparse.Namespace, argv: list[str]) -> None:
    from kvbench.harness.lm_eval.run import LmEvalSpec, run_lm_eval
    from kvbench.harness.runner.lists import parse_budgets, parse_list, split_list

    spec = LmEvalSpec(
        model=args.model,
        methods=split_list(args.methods, "methods"),  # repeats are merged by configuration once the methods are built
        budgets=parse_budgets(args.budgets, tokens=True),
        tasks=parse_list(args.tasks, "tasks"),
        out=Path(args.out),
        include_paths=[Path(path) for path in args.include_path],
        limit=args.limit,
        seed=args.seed,
        question_tokens=args.question_tokens,
        apply_chat_template=args.apply_chat_template,
        device=args.device,
        dtype=args.dtype,
        force=args.force,
        command=shlex.join(["kvbench", *argv]),
    )
    store = run_lm_eval(spec, progress=not args.no_progress)
    print(f"results: {store.results_path}")
    if not args.no_report:
        _render(store.directory)


def _cmd_export_lm_eval(args: argparse.Namespace) -> None:
    from kvbench.harness.models.loading import load_model
    from kvbench.harness.runner.lists import parse_lengths, parse_list
    from kvbench.harness.runner.sweep import default_sample_cache
    from kvbench.tasks import generate_samples, get_task
    from kvbench.tasks.lm_eval_export import export_task

    tasks = parse_list(args.tasks, "tasks")
    for task in tasks:
        get_task(task)
    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise KVBenchError(f"--samples {args.samples} must be at least 1")
    loaded = load_model(args.model, args.device, args.dtype)
    for task in tasks:
        for length in lengths:
            samples = generate_samples(
                task, loaded.tokenizer, length, args.samples, args.seed, cache_dir=default_sample_cache()
            )
            print(f"{export_task(samples, loaded.tokenizer, length, args.out)}: {len(samples)} docs")
    print(f"tasks: {Path(args.out).resolve()} (lm-eval --include_path, or kvbench lm-eval --include-path)")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from kvbench.harness.artifacts.calibration import calibration_meta, ensure_calibrated
    from kvbench.harness.models.loading import load_model
    from kvbench.methods import REGISTRY, get_method

    method = get_method(args.method)
    if not method.needs_calibration:
        calibrated = sorted(name for name, cls in REGISTRY.items() if cls.needs_calibration)
        raise KVBenchError(f"{method.name} needs no calibration; methods that do: {', '.join(calibrated) or 'none'}")
    loaded = load_model(args.model, args.device, args.dtype)
    path = ensure_calibrated(loaded, method, force=args.force)
    meta = calibration_meta(path)
    print(f"{method.name} for {args.model}: {path} (calibrated in {meta['seconds']} s on {meta['data']})")


TRAIN_OPTIONS = {
    "steps": "steps",
    "length": "length",
    "batch": "batch",
    "lr": "learning_rate",
    "max_cache": "max_cache_size",
    "clusters": "num_clusters",
    "seed": "seed",
}


def _distillation_options(rest: list[str]) -> dict:
    parser = _Parser(prog="kvbench train attention_clustering", add_help=False)
    parser.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    parser.add_argument("--length", type=int, help="tokens per training sequence (default 2048)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    parser.add_argument("--max-cache", type=int, help="entries B kept at each prune while training (default 1024)")
    parser.add_argument("--clusters", type=int, help="centroids K merged from them (default 256)")
    parser.add_argument("--seed", type=int, help="first seed of the training windows (default 0)")
    parsed = parser.parse_args(rest)
    return {field: getattr(parsed, flag) for flag, field in TRAIN_OPTIONS.items() if getattr(parsed, flag) is not None}


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> None:
    from kvbench.harness.files import ensure_writable_dir
    from kvbench.harness.models.loading import load_model, load_model_for_training, save_model
    from kvbench.methods import REGISTRY, get_method

    method = get_method(args.method)
    if method.learns:
        from kvbench.harness.cli.train import train_checkpoint, training_options

        method = get_method(args.method, **training_options(method.name, type(method.config), rest))
        out = Path(args.out)
        if out.is_dir():
            raise KVBenchError(f"--out {out} is a directory; give the checkpoint file to write, e.g. {out}/model.pt")
        loaded = load_model(args.model, args.device, args.dtype)
        summary = train_checkpoint(method, loaded, out)
        losses = ", ".join(f"{k} {v:.4g}" for k, v in summary["losses"].items() if isinstance(v, (int, float)))
        print(
            f"{method.label}: trained on {args.model} in {summary['seconds']:.1f} s ({losses or 'see the checkpoint'}); "
            f"checkpoint {out} ({summary['fingerprint']}); use --methods {method.label}:checkpoint={out}"
        )
        return
    if not method.has_training_step:
        trainable = sorted(name for name, cls in REGISTRY.items() if cls.learns or cls().has_training_step)
        raise KVBenchError(f"{method.name} has no training step; methods that train: {', '.join(trainable)}")
    options = _distillation_options(rest)
    out = Path(args.out)
    ensure_writable_dir(out)
    # Training in bf16 loses most small updates: fp32 unless the user asks otherwise.
    loaded = load_model_for_training(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    record = method.train(loaded.model, loaded.tokenizer, options, say=lambda line: print(line, file=sys.stderr))
    save_model(loaded, out)
    record.update(base_model=loaded.source, dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device))
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    first, last = record["history"][0]["loss"], record["history"][-1]["loss"]
    print(
        f"{method.name}: fine-tuned {args.model} for {len(record['history'])} steps in {record['seconds']} s "
        f"(loss {first:.4f} -> {last:.4f}); saved to {out} (use --model {out})"
    )


def _read_run(run_dir: Path):
    """The run a report, comparison or summary reads. Store lines that hold no row are said on stderr (and in the
    report's notes): its numbers leave them out, and a damaged store must not pass for a whole one."""
    from kvbench.reports import load_run

    run = load_run(run_dir)
    note = run.unreadable_note(str(run.run_dir / "results.jsonl"))
    if note:
        print(f"kvbench: note: {note}", file=sys.stderr)
    return run


def _render(run_dir: Path, length_bins: tuple[float, ...] | None = None) -> None:
    from kvbench.reports import ReportError, render_report

    try:
        markdown, html = render_report(_read_run(run_dir), length_bins)
    except ReportError as error:
        raise KVBenchError(str(error)) from None
    print(f"report: {markdown}\nreport: {html}")


def _compare(args: argparse.Namespace) -> None:
    from kvbench.reports import ReportError
    from kvbench.reports.compare import compare_markdown

    try:
        pairs = [tuple(pair) for pair in args.pair]
        print(compare_markdown(_read_run(Path(args.run_dir)), pairs, _length_bins(args)))
    except ReportError as error:
        raise KVBenchError(str(error)) from None


def _quiet_loaders() -> None:
    """Model loading prints progress bars and warnings that drown kvbench's one-screen answer."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported (GGUF dequantisation uses it)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _directories_to_create(args: argparse.Namespace) -> list[Path]:
    """--out of the commands that write a run directory, and those of its parents, that do not exist yet, deepest
    first: what the command creates (the argument checks prove --out writable by creating it)."""
    if args.command not in ("run", "lm-eval", "export-lm-eval"):
        return []
    missing = []
    directory = Path(args.out).absolute()
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    """A command that fails before writing anything leaves no empty directory behind; rmdir removes only an empty
    one, so nothing written there (by this run or another) can go."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    created: list[Path] = []
    try:
        parser = build_parser()
        # `train` takes the options of the method it trains, which only that method knows.
        args, rest = parser.parse_known_args(argv) if argv[:1] == ["train"] else (parser.parse_args(argv), [])
        created = _directories_to_create(args)
        # Before any heavy import or model load: a mistake in the arguments is reported in milliseconds.
        check_arguments(args)
        if args.command == "list":
            _cmd_list(args)
        elif args.command == "data":
            _cmd_data(args)
        elif args.command == "report":
            _render(Path(args.run_dir), _length_bins(args))
        elif args.command == "compare":
            _compare(args)
        elif args.command == "generate":
            _quiet_loaders()
            _cmd_generate(args)
        elif args.command == "lm-eval":
            _quiet_loaders()
            _cmd_lm_eval(args, argv)
        elif args.command == "export-lm-eval":
            _quiet_loaders()
            _cmd_export_lm_eval(args)
        elif args.command == "calibrate":
            _quiet_loaders()
            _cmd_calibrate(args)
        elif args.command == "train":
            _quiet_loaders()
            _cmd_train(args, rest)
        else:
            _quiet_loaders()
            _cmd_run(args, argv)
    except KVBenchError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvbench: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - anything else is a bug: one line for the user, the rest on disk
        print(f"kvbench: error: {_unexpected(error)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _remove_if_empty(created)  # a finished command has written into them, so this takes only a failed one's
    return 0


def _unexpected(error: Exception) -> str:
    """One line for an exception kvbench did not expect, with the file its full traceback went to."""
    import tempfile
    import traceback

    handle, path = tempfile.mkstemp(prefix="kvbench-traceback-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(" ".join(sys.argv) + "\n\n")
        traceback.print_exception(error, file=stream)
    message = " ".join(str(error).split())[:300]
    return f"unexpected {type(error).__name__}: {message} (a kvbench bug: please report it with {path})"


if __name__ == "__main__":
    sys.exit(main())
