"""`math_boxed`: the final answer of a math solution (AIME25, MATH500), read from its last `\\boxed{}` and compared
with the reference by normalised string match, then by math-verify's symbolic / numeric equivalence.

Definition, per prediction and reference (1 if any reference matches, else 0):

1. **Extraction** (Hendrycks et al.'s MATH `last_boxed_only_string`, hendrycks/math `modeling/dataset/util.py`):
   the last `\\boxed`, or the last `\\fbox` when there is no `\\boxed`. `\\boxed{...}` (spaces before the brace
   allowed) gives what lies inside its balanced braces, nested braces included; `\\boxed X` (a space, no brace,
   as lm-eval's minerva-math `last_boxed_only_string` reads it) gives the text up to the next `$` or line end. No
   box, an empty one, or a last box whose braces never close (a generation cut off inside it) scores 0: an earlier
   box is not taken instead, and no unboxed text is ever read as the answer.
2. **Normalised string match**, both sides normalised as MATH's `_strip_string` (hendrycks/math
   `modeling/math_equivalence.py`): line breaks, `\\!`, `\\left`, `\\right`, degree marks, `\\$`, `%` and spaces
   dropped; `\\dfrac`/`\\tfrac` read as `\\frac`; a unit after `\\text{ ` (brace, space) dropped; a left side of
   at most two characters before a single `=` dropped (`x=5` answers `5`: MATH's own rule); `\\sqrt3` and
   `\\frac12` braced; `a/b` of two integers read as `\\frac{a}{b}`; a leading `.` as `0.`. Added here: a
   `\\text{...}`/`\\textbf{...}`/`\\mbox{...}` wrapper is unwrapped (`\\text{Evelyn}` answers `Evelyn`), a trailing
   `.` is dropped, and an integer is read as its value (AIME's `033` answers `33`; `1,000` answers `1000`).
3. **Equivalence**, where the strings differ: math-verify (`parse` of each side wrapped in `$...$`, then
   `verify(gold, prediction)`), which compares numbers numerically (`0.5` and `\\frac{1}{2}`) and expressions
   symbolically (`\\frac{1}{2}+\\sqrt{2}` and `\\sqrt{2}+\\frac{1}{2}`); its own timeouts (5 s) apply in the main
   thread, none elsewhere (they use `signal.alarm`). A parse or comparison failure scores 0; a math-verify that
   parses no LaTeX at all (a missing ANTLR runtime, which it only logs) is an error, not a run of zeros.

kvpress's own AIME25/MATH500 scorers (NVIDIA/kvpress `evaluation/benchmarks/{aime25,math500}/calculate_metrics.py`)
compare the last (AIME25) or first (MATH500) boxed content with the answer as exact strings; the normalisation and
math-verify here accept what they would count wrong for form alone (`\\frac{1}{2}` for `0.5`, `033` for `33`).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Sequence

from kvbench.tasks.errors import TaskError

# The instruction the field appends to a math problem (the DeepSeekMath and DeepSeek-R1 model cards' chain-of-thought
# prompt for math: `{question}\nPlease reason step by step, and put your final answer within \boxed{}.`).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_VERIFY_TIMEOUT_S = 5

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_INTEGER = re.compile(r"-?\d+")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (else the last `\\fbox{...}`), or None (see the module docstring)."""
    name = "\\boxed"
    at = text.rfind(name)
    if at < 0:
        name = "\\fbox"
        at = text.rfind(name)
        if at < 0:
            return None
    rest = text[at + len(name) :]
    opened = rest.lstrip(" ")
    if opened.startswith("{"):
        depth = 0
        for index, char in enumerate(opened):
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return opened[1:index].strip() or None
        return None  # never closed: the generation stopped inside the box
    if rest[:1] == " ":
        return rest.strip().split("$")[0].split("\n")[0].strip() or None
    return None


def _fix_sqrt(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}` (one character braced, as MATH's `_fix_sqrt`)."""
    return re.sub(r"\\sqrt([^{\\\s])", r"\\sqrt{\1}", text)


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{b}` -> `\\frac{1}{b}` (MATH's `_fix_fracs`)."""
    pieces = text.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece.startswith("{") or len(piece) < 2:
            out += piece
        elif piece[1] == "{":
            out += "{" + piece[0] + "}" + piece[1:]
        else:
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
    return out


def normalize(answer: str) -> str:
    """A final answer in the normal form compared as a string (module docstring, step 2)."""
    text = answer.replace("\n", "").replace("\\!", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "").replace("$", "")
    head, unit, _ = text.partition("\\text{ ")
    if unit and head.strip():  # `5 \text{ cm}`: the unit on the right goes
        text = head
    while _TEXT_WRAPPER.search(text):
        text = _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    text = text.strip().rstrip(".").strip()
    if text.startswith("."):
        text = "0" + text
    if text.count("=") == 1 and len(text.split("=")[0].strip()) <= 2:
        text = text.split("=")[1]
    text = _fix_sqrt(text).replace(" ", "")
    text = _fix_fracs(text)
    fraction = re.fullmatch(r"(-?\d+)/(\d+)", text)
    if fraction:
        text = "\\frac{" + fraction.group(1) + "}{" + fraction.group(2) + "}"
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _INTEGER.fullmatch(text):
        text = str(int(text))
    return text


def _timeout() -> int | None:
    """math-verify's timeouts use `signal.alarm`, which only the main thread may set: off elsewhere."""
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its timeout is off
    return None


@functools.cache
def _check_math_verify() -> None:
    """math-verify parses no LaTeX at all where its ANTLR runtime is missing or of the wrong version, and says so
    only in a log line: every equivalence would then read as 0. One known pair (1/2 = 0.5) must compare equal."""
    from math_verify import parse, verify

    timeout = _timeout()
    half = parse("$\\frac{1}{2}$", parsing_timeout=timeout)
    if not verify(half, parse("$0.5$", parsing_timeout=timeout), timeout_seconds=timeout):
        raise TaskError(
            "math-verify cannot parse LaTeX here: check its antlr4-python3-runtime "
            "(pip install 'math-verify[antlr4_13_2]')"
        )


def _equivalent(reference: str, answer: str) -> bool:
    """math-verify's verdict on `answer` against the reference; False where it cannot parse or compare them."""
    from math_verify import parse, verify

    _check_math_verify()
    timeout = _timeout()
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        target = parse(f"${answer}$", parsing_timeout=timeout)
        return bool(gold and target and verify(gold, target, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - math-verify's parser or sympy failing on odd input means: not shown equal
        return False


def math_boxed(prediction: str, references: Sequence[str], **_) -> float:
    """1 if the last boxed answer of `prediction` equals a reference (normalised, or by math-verify), else 0."""
    if not references:
        raise TaskError("cannot score a sample without references")
    answer = last_boxed(prediction)
    if answer is None:
        return 0.0
    normal = normalize(answer)
    for reference in references:
        if normalize(str(reference)) == normal:
            return 1.0
    return float(any(_equivalent(str(reference), answer) for reference in references))
