"""Argument checks that run before torch is imported or a model is loaded, so a mistake costs milliseconds.

Importing the method modules takes seconds (torch, transformers), so method names and options come from an
index read from the sources with `ast`: every class decorated `@register` in `kvbench.methods`, its `name` and
its `Config` dataclass fields with their defaults and declared values (`kvbench.harness.method_spec.option`), so
an option's type and range are checked here with the registry's own functions and messages. Plug-in methods are
not in it: with any plug-in installed, a name the index does not know is left to the registry. The full checks
(options of several fields together, calibration, the model's real limits) still run later; this module only
moves forward what the arguments alone can tell. Whether CUDA is there is read from files where they can tell
(`cuda_absence`); only where they cannot is torch asked, still before any model loads.
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvbench.harness.cli.length_bins import parse_length_bins
from kvbench.harness.errors import KVBenchError, UnknownNameError
from kvbench.harness.method_spec import (
    Allowed,
    OptionError,
    format_value,
    option_problem,
    parse_method_spec,
    parse_option,
)
from kvbench.harness.models import DEVICES, DTYPE_NAMES
from kvbench.harness.plugins import method_entry_points
from kvbench.harness.runner.lists import check_lengths, split_list
from kvbench.harness.token_budget import parse_budget

# A field default that is no literal (the index cannot type the option's text: the registry does).
NOT_LITERAL = object()


@dataclass(frozen=True)
class IndexedOption:
    """A config field as its source declares it: its default (`NOT_LITERAL` when the source's is none) and the
    values it admits (None when its `option(...)` call has arguments the index cannot read)."""

    name: str
    default: Any
    default_text: str
    allowed: Allowed | None


@dataclass(frozen=True)
class MethodEntry:
    """A registered method as its source declares it; `options` is None when its Config is not in its module."""

    name: str
    module: str
    options: tuple[IndexedOption, ...] | None


def _decorated_register(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "register") or (
            isinstance(target, ast.Attribute) and target.attr == "register"
        ):
            return True
    return False


def _class_assignments(node: ast.ClassDef) -> dict[str, ast.expr]:
    found = {}
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                found[target.id] = statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            found[statement.target.id] = statement.value
    return found


def _literal(node: ast.expr, constants: dict[str, Any]) -> Any:
    """A literal, a name bound to one at the top of the module, or a tuple of those (`(0, *BITS)`)."""
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        items: list[Any] = []
        for element in node.elts:
            if isinstance(element, ast.Starred):
                items.extend(_literal(element.value, constants))
            else:
                items.append(_literal(element, constants))
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return ast.literal_eval(node)


def _module_constants(tree: ast.Module) -> dict[str, Any]:
    constants: dict[str, Any] = {}
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            try:
                constants[statement.targets[0].id] = _literal(statement.value, constants)
            except (ValueError, TypeError, SyntaxError):
                continue
    return constants


def _is_option_call(node: ast.expr | None) -> bool:
    if not isinstance(node, ast.Call):
        return False
    target = node.func
    return (isinstance(target, ast.Name) and target.id == "option") or (
        isinstance(target, ast.Attribute) and target.attr == "option"
    )


def _indexed_option(name: str, value: ast.expr | None, constants: dict[str, Any]) -> IndexedOption:
    """A field's default and declared values; defaults print as `kvbench.harness.method_spec` prints them."""
    if value is None:
        return IndexedOption(name, NOT_LITERAL, "required", None)
    allowed: Allowed | None = Allowed()
    if _is_option_call(value):
        keywords = {keyword.arg: keyword.value for keyword in value.keywords if keyword.arg}
        default_node = value.args[0] if value.args else keywords.pop("default", None)
        try:
            allowed = Allowed(**{key: _literal(node, constants) for key, node in keywords.items()})
        except (ValueError, TypeError, SyntaxError):
            allowed = None
        value = default_node
        if value is None:
            return IndexedOption(name, NOT_LITERAL, "required", None)
    try:
        default = _literal(value, constants)
    except (ValueError, TypeError, SyntaxError):
        return IndexedOption(name, NOT_LITERAL, ast.unparse(value), None)
    return IndexedOption(name, default, format_value(default), allowed)


def _config_fields(config: ast.ClassDef, constants: dict[str, Any]) -> tuple[IndexedOption, ...]:
    fields = []
    for statement in config.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(statement.annotation):
            continue
        fields.append(_indexed_option(statement.target.id, statement.value, constants))
    return tuple(fields)


def _methods_directory() -> Path | None:
    spec = importlib.util.find_spec("kvbench.methods")  # imports `kvbench` (a namespace) only, never the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def method_index() -> dict[str, MethodEntry]:
    """Registered method names (and their config options) from the sources of `kvbench.methods`, as
    `kvbench.methods.load_all` would register them: the public modules of the package and of its sub-packages."""
    directory = _methods_directory()
    index: dict[str, MethodEntry] = {}
    if directory is None:
        return index
    for path in sorted(directory.rglob("*.py")):
        relative = path.relative_to(directory).with_suffix("")
        if any(part.startswith("_") for part in relative.parts):
            continue
        source = path.read_text(encoding="utf-8")
        if "@register" not in source:  # helpers, features, training: parsing them would only cost time
            continue
        tree = ast.parse(source, filename=str(path))
        constants = _module_constants(tree)
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in classes.values():
            if not _decorated_register(node):
                continue
            assigned = _class_assignments(node)
            name = assigned.get("name")
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                continue
            config = assigned.get("Config")
            config_class = classes.get(config.id) if isinstance(config, ast.Name) else None
            options = _config_fields(config_class, constants) if config_class is not None else None
            index[name.value] = MethodEntry(name.value, ".".join(relative.parts), options)
    return index


def check_method(text: str) -> None:
    """`NAME:option=value:...` as the registry will check it: the name, each option's name and type in the order
    given, then each value against its declared range in field order, then a base scorer's options (the
    `base_options` of a config with a `base`). Only checks of several options together wait for the registry."""
    spec = parse_method_spec(text)
    index = method_index()
    if not index:  # sources not found (a frozen install): leave it to the registry
        return
    if spec.name not in index:
        if method_entry_points():  # a plug-in may register it: the registry decides, after loading them
            return
        raise UnknownNameError(f"unknown method {spec.name!r}; valid methods: {', '.join(sorted(index))}")
    options = index[spec.name].options
    if options is None or not spec.options:
        return
    typed = _checked_options(spec.name, options, spec.options)
    _check_base_options(spec.name, options, typed, index)


def _checked_options(
    method: str, options: tuple[IndexedOption, ...], given: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """`configured_options` and then `check_values` of the registry, on the index: the typed values."""
    fields = {option.name: option for option in options}
    typed: dict[str, Any] = {}
    for key, text in given:
        if key not in fields:
            listed = ", ".join(f"{option.name}={option.default_text}" for option in options) or "none"
            raise OptionError(f"{method} has no option {key!r}; its options (defaults): {listed}")
        field = fields[key]
        if field.default is NOT_LITERAL or field.allowed is None:  # the source does not say: the registry will
            continue
        try:
            typed[key] = parse_option(key, text, field.default, field.allowed)
        except OptionError as error:
            raise OptionError(f"{method}: {error}") from None
    for field in options:
        if field.name in typed:
            problem = option_problem(field.name, typed[field.name], field.default, field.allowed)
            if problem is not None:
                raise OptionError(f"{method}: {problem}")
    return typed


def _check_base_options(
    method: str, options: tuple[IndexedOption, ...], typed: dict[str, Any], index: dict[str, MethodEntry]
) -> None:
    """A base scorer's options (`base_options=option=value/option=value`), as `scorer_config` checks them."""
    fields = {option.name: option for option in options}
    if "base" not in fields or "base_options" not in typed:
        return
    base = typed.get("base", fields["base"].default)
    entry = index.get(base) if isinstance(base, str) else None
    if entry is None or entry.options is None:
        return
    pairs = []
    for part in filter(None, (p.strip() for p in typed["base_options"].split("/"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise OptionError(
                f"{method}: base option {part!r} is not option=value (e.g. base_options=window=32/kernel=7)"
            )
        pairs.append((key.strip(), value.strip()))
    try:
        _checked_options(base, entry.options, tuple(pairs))
    except OptionError as error:
        raise OptionError(f"{method}: base {error}") from None


def check_device_and_dtype(device: str, dtype: str) -> None:
    """The names, and for `--device cuda` whether CUDA can be there at all, from files (`cuda_absence`)."""
    if device not in DEVICES:
        raise KVBenchError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise KVBenchError(f"unknown dtype {dtype!r}; valid dtypes: auto, {', '.join(DTYPE_NAMES)}")
    if device == "cuda":
        absent = cuda_absence()
        if absent is not None:
            raise KVBenchError(f"--device cuda was asked for but {absent}; use --device cpu")


def cuda_absence() -> str | None:
    """Why CUDA surely is unavailable, from the environment and a few files, without importing torch (seconds);
    None where they cannot tell, which `check_cuda_with_torch` then asks torch. Sure means: every GPU hidden by
    CUDA_VISIBLE_DEVICES, a torch built without CUDA or ROCm (its version.py, read as text), or, on Linux, a
    CUDA build with no NVIDIA driver loaded (no /proc/driver/nvidia, no /dev/nvidia*, no WSL /dev/dxg)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.split(",")[0].strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    build = _torch_build()
    if build is None:
        return None
    if build.get("cuda") is None and build.get("hip") is None:
        return f"this torch ({build.get('__version__', 'unknown version')}) is built without CUDA"
    if build.get("hip") is None and sys.platform.startswith("linux") and not _nvidia_driver_loaded():
        return "no NVIDIA driver is loaded (no /proc/driver/nvidia, no /dev/nvidia*)"
    return None


def _torch_build() -> dict[str, Any] | None:
    """`__version__`, `cuda` and `hip` of the installed torch's version.py, or None where it cannot be read."""
    spec = importlib.machinery.PathFinder.find_spec("torch")  # on sys.path, without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse(Path(next(iter(spec.submodule_search_locations)), "version.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    found: dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("__version__", "cuda", "hip"):
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                return None
    return found if {"cuda", "hip"} <= found.keys() else None


def _nvidia_driver_loaded() -> bool:
    if Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists():
        return True
    return any(Path("/dev").glob("nvidia*"))


def check_cuda_with_torch(device: str) -> None:
    """For `--device cuda` where the files could not tell (`cuda_absence`): torch itself, still before any model
    load or sample (the same line `resolve_device` would say after it)."""
    if device != "cuda" or cuda_absence() is not None:
        return
    import torch

    if not torch.cuda.is_available():
        raise KVBenchError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def check_at_least(value: int | None, flag: str, least: int) -> None:
    if value is not None and value < least:
        raise KVBenchError(
            f"{flag} {value} must be at least {least}" if least > 0 else f"{flag} {value} must be 0 or more"
        )


def check_tasks(text: str, datasets: bool = False) -> None:
    from kvbench.tasks import check_task, get_task  # the task registry imports no torch

    for name in split_list(text, "tasks"):
        check_task(name) if datasets else get_task(name)


def check_data_run(args) -> None:
    """`kvbench run`'s data-set arguments: --data NAME=PATH that exist, and --lengths for generated tasks (a data
    set's own lengths need none). Whether a data set is on disk is checked before the model loads (sweep)."""
    from kvbench.tasks import is_dataset_task
    from kvbench.tasks.datasets.catalog import parse_data_paths

    parse_data_paths(args.data)
    if args.lengths is None:
        generated = [name for name in split_list(args.tasks, "tasks") if not is_dataset_task(name)]
        if generated:
            raise KVBenchError(f"task {generated[0]} is generated to a length: give --lengths")


def check_data_present(args, lengths: list[int | None]) -> None:
    """A data-set task that is surely absent (no local file, no Hugging Face cache folder for it) is one line here,
    in well under a second; one that may be present is left to the run's check before the model loads."""
    from kvbench.tasks import is_dataset_task
    from kvbench.tasks.datasets.catalog import parse_data_paths
    from kvbench.tasks.datasets.presence import surely_missing

    data = parse_data_paths(args.data)
    for name in split_list(args.tasks, "tasks"):
        if is_dataset_task(name):
            for length in lengths:
                message = surely_missing(name, data, length)
                if message is not None:
                    raise KVBenchError(message)


def check_writable(directory: str) -> None:
    from kvbench.harness.files import ensure_writable_dir

    ensure_writable_dir(Path(directory))


def check_model(model: str) -> int | None:
    """That the model exists and kvbench can serve it, and its maximum length, from its config alone (see
    `models.loading.model_max_length`)."""
    from kvbench.harness.models.loading import check_model_supported, model_max_length

    check_model_supported(model)
    return model_max_length(model)


def _lm_eval_task_sources(include_paths: list[str]) -> list[Path]:
    spec = importlib.util.find_spec("lm_eval")
    roots = [Path(path) for path in include_paths]
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))) / "tasks")
    return roots


def absent_lm_eval_tasks(names: list[str], include_paths: list[str]) -> list[str]:
    """Names that appear in no task config file at all (lm-eval's own tasks and the include paths): surely
    unknown. A name that appears somewhere is left to lm-eval's TaskManager, whose full index takes seconds.
    Task configs are YAML files and the extension-less templates they include."""
    left = set(names)
    for root in _lm_eval_task_sources(include_paths):
        for directory, _, files in os.walk(root):
            for file in files:
                if not (file.endswith((".yaml", ".yml")) or "." not in file):
                    continue
                try:
                    text = Path(directory, file).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                left = {name for name in left if name not in text}
                if not left:
                    return []
    return [name for name in names if name in left]


def check_arguments(args: argparse.Namespace) -> None:
    """Everything the arguments of one command can tell, cheapest first: the model's config, then CUDA where only
    torch can tell, and last the directories to write (checking them creates them)."""
    command = args.command
    writes: list[str] = []
    loads_model = command in ("run", "lm-eval", "export-lm-eval", "generate", "calibrate", "train")
    if command in ("run", "report", "compare") and args.length_bins is not None:
        parse_length_bins(args.length_bins)
    if loads_model:
        check_device_and_dtype(args.device, args.dtype)
    if command in ("run", "lm-eval"):
        for method in split_list(args.methods, "methods"):
            check_method(method)
        for budget in split_list(args.budgets, "budgets"):
            parse_budget(budget)  # fractions and token budgets (`256t`)
    if command in ("calibrate", "train"):
        check_method(args.method)
    if command == "generate":
        check_generate_sources(args)
        if args.method is not None:
            check_method(args.method)
        if args.budget is not None:
            parse_budget(args.budget)  # a fraction, or tokens per KV head (256t)
        check_at_least(args.max_new_tokens, "--max-new-tokens", 1)
        if args.load_cache is None:
            read_prompt(args)
        maximum = check_model(args.model)
        if maximum is not None and args.max_new_tokens >= maximum:
            raise KVBenchError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in {args.model}'s maximum "
                f"of {maximum} tokens"
            )
    if command in ("run", "export-lm-eval"):
        check_tasks(args.tasks, datasets=command == "run")
        if command == "run":
            check_data_run(args)
        lengths = check_lengths(args.lengths) if args.lengths is not None else []
        check_at_least(args.samples, "--samples", 1)
        maximum = check_model(args.model)
        if maximum is not None and lengths and max(lengths) > maximum:
            raise KVBenchError(f"length {max(lengths)} exceeds {args.model}'s maximum of {maximum} tokens")
        if command == "run":
            check_data_present(args, lengths or [maximum])
        writes.append(args.out)
    if command == "lm-eval":
        check_at_least(args.limit, "--limit", 1)
        check_at_least(args.question_tokens, "--question-tokens", 0)
        for path in args.include_path:
            if not Path(path).is_dir():
                raise KVBenchError(f"--include-path {path} is not a directory")
        absent = absent_lm_eval_tasks(split_list(args.tasks, "tasks"), args.include_path)
        if absent:
            raise KVBenchError(
                f"unknown lm-eval task {absent[0]!r}; pass the directory of its YAML with --include-path "
                "(kvbench export-lm-eval writes kvbench's tasks there)"
            )
        check_model(args.model)
        writes.append(args.out)
    if command == "generate" and args.save_cache is not None:
        writes.append(str(Path(args.save_cache).resolve().parent))
    if command in ("calibrate", "train"):
        check_model(args.model)
    if command == "train":
        # --out is a checkpoint file (learned methods) or a model directory (attention_clustering): its parent
        # must be writable either way; the command itself creates the rest.
        writes.append(str(Path(args.out).resolve().parent))
    if command == "report":
        run_dir = Path(args.run_dir)
        if not (run_dir / "run.json").is_file():
            raise KVBenchError(f"no run.json in {run_dir}; pass a run directory written by `kvbench run`")
    if loads_model:
        check_cuda_with_torch(args.device)
    for directory in writes:
        check_writable(directory)


def check_generate_sources(args: argparse.Namespace) -> None:
    """`generate` compresses a prompt (--method, --budget, --prompt or --prompt-file; --save-cache optional) or
    answers a stored context (--load-cache; method and budget come from the file, and must match if given)."""
    if args.load_cache is not None:
        if args.save_cache is not None:
            raise KVBenchError("--save-cache and --load-cache exclude each other: a loaded context is already stored")
        path = Path(args.load_cache)
        if not path.is_file():
            raise KVBenchError(
                f"--load-cache {path} is not a file; write one with 'kvbench generate ... --save-cache FILE'"
            )
        return
    if args.prompt is None and args.prompt_file is None:
        raise KVBenchError(
            "one of the arguments --prompt --prompt-file is required (or --load-cache FILE to answer a stored context)"
        )
    for flag, value in (("--method", args.method), ("--budget", args.budget)):
        if value is None:
            raise KVBenchError(f"{flag} is required to compress a prompt (a --load-cache FILE brings its own)")
    if args.save_cache is not None and Path(args.save_cache).is_dir():
        raise KVBenchError(f"--save-cache {args.save_cache} is a directory; give the file to write")


def read_prompt(args: argparse.Namespace) -> str:
    """The context text of `kvbench generate`, from --prompt or --prompt-file; never empty."""
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise KVBenchError(f"cannot read --prompt-file {args.prompt_file}: {error.__class__.__name__}") from None
    else:
        text = args.prompt
    if not text.strip():
        raise KVBenchError("the prompt is empty; give the context to compress with --prompt or --prompt-file")
    return text
