"""LongBench (v1 and LongBench-E) and LongBench-v2 metrics, as the benchmarks define them.

Definitions (THUDM/LongBench `metrics.py` and `eval.py` for v1, `pred.py` and `result.py` for v2; the code here is
kvbench's own):

- **normalisation** (`normalize_answer`, SQuAD's): lower-case; drop every ASCII punctuation character
  (`string.punctuation`); replace the whole words `a`, `an`, `the` by a space; collapse whitespace.
- **qa_f1**: token-level F1 between the normalised prediction and the normalised reference split on whitespace:
  common = multiset intersection, P = common/|pred|, R = common/|ref|, F1 = 2PR/(P+R), 0 when nothing is common.
- **rouge**: ROUGE-L F-measure of the prediction against the reference. LongBench calls the PyPI package `rouge`
  (`Rouge().get_scores(...)["rouge-l"]["f"]`, 0 when it raises, e.g. on an empty prediction); kvbench computes it
  with `rouge-score` (`rougeL`, no stemming), which tokenises on non-alphanumeric characters: the values can
  differ from the `rouge` package's in the last digits on punctuation-heavy text.
- **classification** (trec, lsht): the classes of `all_classes` that occur as substrings of the prediction; a
  matched class that is a proper substring of the reference is dropped (LongBench removes them while iterating
  over the same list, so a class right after a removed one is not examined: reproduced); score 1/#matched if the
  reference is among them, else 0.
- **retrieval** (passage_retrieval_en): the paragraph number of the reference (`Paragraph (\\d+)`); of all the
  numbers (`\\d+`) in the prediction, the fraction equal to it; 0 without numbers.
- **count** (passage_count): of all numbers in the prediction, the fraction equal to the reference; 0 without.
- **code_sim** (lcc, repobench-p): the first line of the prediction (after leading newlines) that holds none of
  `` ` ``, `#`, `//`; its edit-similarity ratio with the reference (LongBench: `fuzzywuzzy.fuzz.ratio / 100`;
  here `rapidfuzz.fuzz.ratio / 100`, the same Indel similarity 2·matches/(|a|+|b|) without fuzzywuzzy's rounding
  to a whole percent).
- A sample scores the **maximum over its references**; trec, triviaqa, samsum and lsht score only the **first
  line** of the output (`prediction.lstrip('\\n').split('\\n')[0]`), the option `first_line`.
- A subset's score is the mean × 100; LongBench-E also averages by `length` (words/characters as the data set
  records them) in the bins 0-4k, 4-8k, 8k+ (`LONGBENCH_E_BINS`).

LongBench-v2: the answer is the letter after `The correct answer is` (asterisks removed first), in the form
`(A)` or bare `A` (`extract_choice`); accuracy against the `answer` letter; reported Overall and by difficulty
(easy/hard) and length (short/medium/long).

Chinese subsets (`metrics.py`'s Chinese scores; words are `jieba.cut(text, cut_all=False)`, jieba's bundled
dictionary, nothing downloaded):

- **normalize_zh_answer**: lower-case; drop every character of `string.punctuation` and of LongBench's list of
  Chinese punctuation (`ZH_PUNCTUATION`); remove all whitespace (no articles).
- **qa_f1_zh** (multifieldqa_zh): the jieba words of prediction and reference, each word normalised, empty words
  dropped; token F1 as qa_f1.
- **rouge_zh** (dureader, vcsum): the jieba words joined by spaces, then ROUGE-L F. LongBench passes them to the
  `rouge` package; kvbench uses `rouge-score`'s `rougeL` (as for the English subsets) with a whitespace tokenizer
  (rouge-score's default one keeps only `[a-z0-9]` and would drop every Chinese character): LCS over the words,
  P = LCS/|pred|, R = LCS/|ref|. The `rouge` package differs in two ways: it splits each text into sentences at
  ASCII `.` and takes the union LCS over them, and its |pred| and |ref| count distinct words (its `Ngrams` sets),
  so texts with repeated words or an ASCII `.` score differently; it does not lower-case, nor does kvbench here.
  0 when either side has no words (the `rouge` package raises and LongBench scores 0).
- **classification** (lsht): as trec, on the first line; the classes are Chinese names, matched as substrings.
- **retrieval_zh** (passage_retrieval_zh): as retrieval with the paragraph number from `段落(\\d+)`.

No Chinese subset is in LongBench-E (pred.py's `--e` list is English only).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from kvbench.tasks.errors import TaskError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# LongBench metrics.py normalize_zh_answer's cn_punctuation (InfiniteBench's compute_scores.py uses the same list).
ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ZH_DROPPED = frozenset(string.punctuation + ZH_PUNCTUATION)
FIRST_LINE_SUBSETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
LONGBENCH_E_BINS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, None))


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD / LongBench order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace (LongBench's normalize_zh_answer)."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_DROPPED).split())


@lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages, not errors
    return jieba


def jieba_words(text: str) -> list[str]:
    """jieba's accurate-mode words of `text` (`jieba.cut(text, cut_all=False)`)."""
    return list(_jieba().cut(text, cut_all=False))


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of two token multisets; 0 when they share nothing (including when either is empty)."""
    common = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def first_line(prediction: str) -> str:
    """LongBench's rule for trec, triviaqa, samsum, lsht: drop leading newlines, keep the first line."""
    return prediction.lstrip("\n").split("\n")[0]


def qa_f1_one(prediction: str, reference: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh_one(prediction: str, reference: str) -> float:
    def words(text: str) -> list[str]:
        return [word for word in map(normalize_zh_answer, jieba_words(text)) if word]

    return token_f1(words(prediction), words(reference))


@lru_cache(maxsize=1)
def _rouge_l():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_one(prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0  # LongBench's `rouge` raises on empty text and scores 0
    return _rouge_l().score(reference, prediction)["rougeL"].fmeasure


class _Whitespace:
    """A rouge-score tokenizer that splits on whitespace only (the words are jieba's)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=1)
def _rouge_l_words():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_Whitespace())


def rouge_zh_one(prediction: str, reference: str) -> float:
    prediction, reference = " ".join(jieba_words(prediction)), " ".join(jieba_words(reference))
    if not prediction.split() or not reference.split():
        return 0.0
    return _rouge_l_words().score(reference, prediction)["rougeL"].fmeasure


def classification_one(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    matched = [name for name in all_classes if name in prediction]
    # LongBench removes from the list it iterates over: the element after each removal is skipped.
    index = 0
    while index < len(matched):
        term = matched[index]
        if term in reference and term != reference:
            del matched[index]
            index += 1  # the list shifted left: the next term now sits at `index` and is stepped over
            continue
        index += 1
    return 1.0 / len(matched) if reference in matched else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def retrieval_one(prediction: str, reference: str) -> float:
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise TaskError(f"passage_retrieval reference {reference!r} names no 'Paragraph N'")
    return _fraction_equal(prediction, found[0])


def retrieval_zh_one(prediction: str, reference: str) -> float:
    found = re.findall(r"段落(\d+)", reference)
    if not found:
        raise TaskError(f"passage_retrieval_zh reference {reference!r} names no '段落N'")
    return _fraction_equal(prediction, found[0])


def count_one(prediction: str, reference: str) -> float:
    return _fraction_equal(prediction, str(reference))


def code_sim_one(prediction: str, reference: str) -> float:
    from rapidfuzz import fuzz

    line = next(
        (
            text
            for text in prediction.lstrip("\n").split("\n")
            if "`" not in text and "#" not in text and "//" not in text
        ),
        "",
    )
    return fuzz.ratio(line, reference) / 100


def _best(one, prediction: str, references: Sequence[str], first: bool, **extra) -> float:
    if not references:
        raise TaskError("cannot score a sample without references")
    text = first_line(prediction) if first else prediction
    return max(one(text, reference, **extra) for reference in references)


def longbench_qa_f1(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench qa_f1: best token F1 after normalisation (narrativeqa, qasper, multifieldqa_en, hotpotqa,
    2wikimqa, musique, triviaqa)."""
    return _best(qa_f1_one, prediction, references, first_line)


def longbench_rouge(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench rouge: best ROUGE-L F (gov_report, qmsum, multi_news, samsum)."""
    return _best(rouge_l_one, prediction, references, first_line)


def longbench_qa_f1_zh(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench qa_f1_zh (multifieldqa_zh): best token F1 over jieba words, each normalised."""
    return _best(qa_f1_zh_one, prediction, references, first_line)


def longbench_rouge_zh(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench rouge_zh (dureader, vcsum): best ROUGE-L F over jieba words."""
    return _best(rouge_zh_one, prediction, references, first_line)


def longbench_classification(
    prediction: str, references: Sequence[str], first_line: bool = False, all_classes: Sequence[str] = (), **_
) -> float:
    """LongBench classification (trec, lsht): 1/#classes named if the right one is among them."""
    if not all_classes:
        raise TaskError("classification needs the sample's all_classes")
    return _best(classification_one, prediction, references, first_line, all_classes=all_classes)


def longbench_retrieval(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench retrieval (passage_retrieval_en): fraction of the output's numbers that are the paragraph's."""
    return _best(retrieval_one, prediction, references, first_line)


def longbench_retrieval_zh(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench retrieval_zh (passage_retrieval_zh): fraction of the output's numbers that are 段落N's N."""
    return _best(retrieval_zh_one, prediction, references, first_line)


def longbench_count(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench count (passage_count): fraction of the output's numbers equal to the count."""
    return _best(count_one, prediction, references, first_line)


def longbench_code_sim(prediction: str, references: Sequence[str], first_line: bool = False, **_) -> float:
    """LongBench code_sim (lcc, repobench-p): edit similarity of the first code line."""
    return _best(code_sim_one, prediction, references, first_line)


_CHOICE_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_CHOICE_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_choice(response: str) -> str | None:
    """LongBench-v2's answer extraction: remove `*`, then `The correct answer is (X)`, else `... is X`."""
    text = response.replace("*", "")
    match = _CHOICE_PAREN.search(text) or _CHOICE_BARE.search(text)
    return match.group(1) if match else None


def longbench_v2_choice(prediction: str, references: Sequence[str], **_) -> float:
    """LongBench-v2 accuracy: 1 if the extracted letter is the answer letter, 0 otherwise (also when none)."""
    if not references:
        raise TaskError("cannot score a sample without references")
    return float(extract_choice(prediction) == references[0])


def longbench_e_bin(length: int) -> str:
    """LongBench-E's length bin of a sample's recorded `length`."""
    for name, low, high in LONGBENCH_E_BINS:
        if length >= low and (high is None or length < high):
            return name
    raise TaskError(f"negative length {length}")


def needle_rouge_l(prediction: str, references: Sequence[str], **_) -> float:
    """Needle in a haystack over essays (kvpress `benchmarks/needle_in_haystack`): ROUGE-L F of the output against
    the needle sentence (the reference), best over references; 0 for an empty output."""
    if not references:
        raise TaskError("cannot score a sample without references")
    return max(rouge_l_one(prediction.strip(), reference) for reference in references)
