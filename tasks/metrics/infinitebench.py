"""InfiniteBench per-task scores, as OpenBMB/InfiniteBench `src/compute_scores.py` defines them (kvbench's code).

Each returns 0/1 (or a fraction) for one prediction against the sample's answer list:

- **passkey**, **number_string**: the first run of digits of the prediction (`re.split('[^0-9]')`, first
  non-empty piece) equals the answer. (The official script compares it with the answer list as stored; the
  answer string is its first element, used here.)
- **kv_retrieval**: replace each of ``\\n : " ' . , ? ! { }`` by a space, split on whitespace; the answer (a
  UUID) is one of the words.
- **longdialogue_qa_eng**: the same splitting, words upper-cased; the first answer (an upper-case name) is one of
  the words.
- **longbook_choice_eng**, **code_debug**: multiple choice; the answer is the option text and its letter
  (`answer_letters` pairs them from `options`, as `eval_utils.get_answer`). longbook_choice_eng: the first
  character if it is one of A-D, else the text after the first of `answer is:`, `answer:`, `answer is`,
  `option is` (punctuation spaced out first), else the first whole word A-D. code_debug: `X.` or `X:` at the
  start, else what follows `answer is:`, `is:` or `answer:` must start with the letter or the function name.
- **longbook_qa_eng**: best token F1 after SQuAD normalisation (as LongBench's qa_f1).
- **longbook_sum_eng**: ROUGE-Lsum F (the official script uses `evaluate`'s rouge; here `rouge-score`'s
  `rougeLsum`, which `evaluate` wraps, without stemming).
- **code_run**: the last whitespace word of the prediction (after replacing ``\\n . ` ' " :`` by spaces) read as
  an integer equals the answer.
- **math_calc**: the prediction's integers in order; the fraction of leading values equal to the expected list,
  stopping at the first mismatch.
- **math_find**: the first number (`\\d+\\.\\d+|\\d+`) of the prediction equals the answer (as int when the answer
  is an integer, else as float).

- **longbook_qa_chn**: best F1 over characters (`qa_f1_score_zh`: "one character one token") after the Chinese
  normalisation (`normalize_zh_answer`: lower-case, ASCII and Chinese punctuation dropped, whitespace removed; the
  same as LongBench's); no word segmentation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvbench.tasks.errors import TaskError
from kvbench.tasks.metrics.longbench import normalize_answer, normalize_zh_answer, token_f1

_RETRIEVAL_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def _require(references: Sequence[str]) -> None:
    if not references:
        raise TaskError("cannot score a sample without references")


def first_int_match(prediction: str) -> str:
    return next((piece for piece in re.split("[^0-9]", prediction) if piece), "")


def _words(prediction: str, separators: Sequence[str]) -> list[str]:
    for char in separators:
        prediction = prediction.replace(char, " ")
    return prediction.split()


def _spaced(text: str, separators: Sequence[str]) -> str:
    """Each separator replaced by a space, then runs of spaces collapsed to one (the official scripts' cleaning)."""
    for separator in separators:
        text = text.replace(separator, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _after_first(text: str, prefixes: Sequence[str]) -> str | None:
    """What follows the first of `prefixes` (tried in order) found in `text`, past one character (the space the
    official scripts skip); empty when nothing follows; None when no prefix is found."""
    for prefix in prefixes:
        at = text.find(prefix)
        if at != -1:
            return text[at + len(prefix) + 1 :]
    return None


def infbench_first_int(prediction: str, references: Sequence[str], **_) -> float:
    """passkey, number_string."""
    _require(references)
    return float(first_int_match(prediction) == str(references[0]))


def infbench_kv_retrieval(prediction: str, references: Sequence[str], **_) -> float:
    _require(references)
    return float(str(references[0]) in _words(prediction, _RETRIEVAL_SEPARATORS))


def infbench_dialogue(prediction: str, references: Sequence[str], **_) -> float:
    """longdialogue_qa_eng."""
    _require(references)
    return float(str(references[0]) in [word.upper() for word in _words(prediction, _RETRIEVAL_SEPARATORS)])


def infbench_choice(prediction: str, references: Sequence[str], **_) -> float:
    """longbook_choice_eng; `references` are the option text and its letter."""
    _require(references)
    if prediction[:1] and prediction[0] in "ABCD":
        return float(prediction[0] in references)
    text = _spaced(prediction, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"))
    after = _after_first(text, ("answer is:", "answer:", "answer is", "option is"))
    if after is not None:
        return float(any(after.startswith(answer) for answer in references))
    for word in text.split():
        if word in "ABCD":
            return float(word in references)
    return 0.0


def infbench_code_debug(prediction: str, references: Sequence[str], **_) -> float:
    """code_debug; `references` are the function name and its letter."""
    if len(references) < 2:
        raise TaskError("code_debug needs the function name and its option letter")
    name, letter = references[0], references[1]
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    text = _spaced(prediction.strip(), ("\n", "`", "'", '"', "-", "*", "Option", "option"))
    after = _after_first(text, ("answer is:", "is:", "answer:"))
    if after is not None:
        return float(after.startswith(letter) or after.startswith(name))
    return 0.0


def infbench_qa_f1(prediction: str, references: Sequence[str], **_) -> float:
    """longbook_qa_eng."""
    _require(references)
    tokens = normalize_answer(prediction).split()
    return max(token_f1(tokens, normalize_answer(reference).split()) for reference in references)


def infbench_rouge_lsum(prediction: str, references: Sequence[str], **_) -> float:
    """longbook_sum_eng."""
    _require(references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return scorer.score(references[0], prediction)["rougeLsum"].fmeasure


def infbench_code_run(prediction: str, references: Sequence[str], **_) -> float:
    _require(references)
    words = _words(prediction.strip(), ("\n", ".", "`", "'", '"', ":"))
    if not words:
        return 0.0
    try:
        return float(int(words[-1]) == int(references[0]))
    except ValueError:
        return 0.0


def infbench_math_calc(prediction: str, references: Sequence[str], **_) -> float:
    _require(references)
    expected = [int(value) for value in references]
    found = [int(piece) for piece in re.split("[^0-9]", prediction) if piece]
    correct = 0
    for want, got in zip(expected, found):
        if want != got:
            break
        correct += 1
    return correct / len(expected)


def infbench_math_find(prediction: str, references: Sequence[str], **_) -> float:
    _require(references)
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return 0.0
    answer = str(references[0]).strip()
    found = match.group(0)
    if re.fullmatch(r"-?\d+", answer):
        return float("." not in found and int(found) == int(answer))
    return float(float(found) == float(answer))


def infbench_qa_f1_zh(prediction: str, references: Sequence[str], **_) -> float:
    """longbook_qa_chn: best character-level F1 after the Chinese normalisation."""
    _require(references)
    return max(token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(r))) for r in references)
