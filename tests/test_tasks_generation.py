"""Task generators: exact prompt strings, needle placement, answers, determinism, length fitting."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from random import Random

import pytest

from kvbench.tasks import (
    GENERATOR_VERSION,
    TASK_SETS,
    TASKS,
    TaskError,
    generate_samples,
    list_tasks,
    score,
    split_prompt,
)
from kvbench.tasks.fingerprint import derive_seed
from kvbench.tasks.generated.fitting import Fitter, Setup
from kvbench.tasks.generated.haystacks import essay_text, split_sentences

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LENGTHS = (1024, 4096)


@pytest.fixture(scope="module")
def generated(tasks_chat_tokenizer):
    """Samples per (task, length), generated once per module: fitting dominates the runtime."""
    made: dict[tuple[str, int], list] = {}

    def get(task: str, length: int) -> list:
        if (task, length) not in made:
            made[task, length] = generate_samples(task, tasks_chat_tokenizer, length, 3)
        return made[task, length]

    return get


def haystack_lines(sample, intro: str) -> list[str]:
    assert sample.context.startswith(intro) and sample.context.endswith("\n")
    return sample.context[len(intro) : -1].split("\n")


# --- registry -------------------------------------------------------------------------------------


def test_registry_lists_the_offline_suite():
    names = [name for name, _ in list_tasks()]
    assert names == [
        "niah_single_1",
        "niah_single_2",
        "niah_single_3",
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
        "vt",
        "cwe",
        "fwe",
        "passkey",
        "reconstruction",
        "chain",
        "perplexity",
    ]
    assert all(description and "\n" not in description for _, description in list_tasks())
    assert {TASKS[n].max_new_tokens for n in names[:8]} == {128}
    assert (TASKS["vt"].max_new_tokens, TASKS["cwe"].max_new_tokens, TASKS["fwe"].max_new_tokens) == (30, 120, 50)
    assert (TASKS["passkey"].max_new_tokens, TASKS["passkey"].metric) == (16, "passkey_exact")
    assert TASK_SETS["RULER-11 offline"] == tuple(names[:11])


def test_unknown_task_names_the_valid_ones(tasks_chat_tokenizer):
    with pytest.raises(TaskError, match="unknown task 'niah_single_9'.*niah_single_1.*passkey") as error:
        generate_samples("niah_single_9", tasks_chat_tokenizer, 1024, 1)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


@pytest.mark.parametrize("task, length", [("niah_single_1", 300), ("vt", 400), ("cwe", 400), ("fwe", 150)])
def test_too_small_length_is_a_one_line_task_error(tasks_chat_tokenizer, task, length):
    with pytest.raises(TaskError, match=f"{task}.*length {length} is too small") as error:
        generate_samples(task, tasks_chat_tokenizer, length, 1)
    assert "\n" not in str(error.value)


def test_nonpositive_sizes_are_rejected(tasks_chat_tokenizer):
    with pytest.raises(TaskError, match="positive"):
        generate_samples("passkey", tasks_chat_tokenizer, 1024, 0)


# --- length fitting -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(TASKS))
def test_every_sample_fits_and_one_more_unit_would_not(tasks_chat_tokenizer, generated, task, length):
    spec = TASKS[task]
    setup = Setup(tasks_chat_tokenizer, task, length, 42, spec.max_new_tokens, False)
    plan, fitter = spec.plan(setup), Fitter(setup)
    for sample in generated(task, length):
        parts = split_prompt(tasks_chat_tokenizer, sample.context, sample.question, sample.answer_prefix)
        measured = len(parts.context_ids) + len(parts.question_ids) + sample.max_new_tokens
        assert measured == sample.metadata["length"] <= length
        units, increment = sample.metadata["num_units"], sample.metadata["increment"]
        seed = derive_seed(42, task, length, sample.sample_id)
        assert plan.render(Random(seed), units).context == sample.context  # regenerates alone
        assert fitter.measure(plan.render(Random(seed), units + 1)) > length
        assert fitter.measure(plan.render(Random(seed), units + increment)) > length


def test_increments_follow_the_length_rules(generated):
    assert [generated("niah_single_1", n)[0].metadata["increment"] for n in LENGTHS] == [5, 25]
    assert [generated("niah_single_2", n)[0].metadata["increment"] for n in LENGTHS] == [100, 500]
    assert [generated("vt", n)[0].metadata["increment"] for n in LENGTHS] == [5, 10]
    assert [generated("cwe", n)[0].metadata["increment"] for n in LENGTHS] == [10, 10]
    assert [generated("fwe", n)[0].metadata["increment"] for n in LENGTHS] == [(1024 - 50) // 32, (4096 - 50) // 32]


def test_query_aware_samples_fit_the_query_aware_split(tasks_chat_tokenizer):
    for sample in generate_samples("niah_single_1", tasks_chat_tokenizer, 1024, 2, query_aware=True):
        parts = split_prompt(tasks_chat_tokenizer, sample.context, sample.question, sample.answer_prefix, True)
        assert parts.question_text.startswith("<|im_end|>")
        assert len(parts.context_ids) + len(parts.question_ids) + 128 == sample.metadata["length"] <= 1024
        assert sample.metadata["query_aware"] is True


# --- determinism and caching ----------------------------------------------------------------------


def test_same_seed_same_samples_and_each_index_stands_alone(tasks_chat_tokenizer, generated):
    again = generate_samples("niah_single_2", tasks_chat_tokenizer, 1024, 2)
    first = generated("niah_single_2", 1024)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in first[:2]]
    assert first[0].context != first[1].context and first[0].references != first[1].references
    other_seed = generate_samples("niah_single_2", tasks_chat_tokenizer, 1024, 1, seed=7)
    assert other_seed[0].references != first[0].references and other_seed[0].metadata["seed"] == 7


def test_metadata_identifies_the_data(tasks_chat_tokenizer, tasks_plain_tokenizer, generated):
    meta = generated("niah_single_2", 1024)[0].metadata
    assert meta["target_length"] == 1024 and meta["seed"] == 42 and meta["generator_version"] == GENERATOR_VERSION
    assert meta["haystack"] == "essay" and re.fullmatch(r"[0-9a-f]{64}", meta["haystack_sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", meta["chat_template_sha256"])
    assert meta["wonderwords_version"] == "3.0.1"
    plain = generate_samples("niah_single_2", tasks_plain_tokenizer, 1024, 1)[0]
    assert plain.metadata["chat_template_sha256"] is None
    assert plain.metadata["vocab_sha256"] == meta["vocab_sha256"]
    json.dumps([s.to_dict() for s in generated("vt", 1024)])  # metadata stays JSON-serializable


def test_cache_hit_returns_identical_samples_without_regenerating(tasks_chat_tokenizer, tmp_path, monkeypatch):
    made = generate_samples("vt", tasks_chat_tokenizer, 1024, 2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("vt-1024-*.json"))) == 1

    def no_fitting(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr("kvbench.tasks.registry.Fitter", no_fitting)
    loaded = generate_samples("vt", tasks_chat_tokenizer, 1024, 2, cache_dir=tmp_path)
    assert [s.to_dict() for s in loaded] == [s.to_dict() for s in made]
    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another key
        generate_samples("vt", tasks_chat_tokenizer, 1024, 2, seed=1, cache_dir=tmp_path)


def test_corrupt_cache_file_is_regenerated(tasks_chat_tokenizer, tmp_path):
    made = generate_samples("passkey", tasks_chat_tokenizer, 1024, 1, cache_dir=tmp_path)
    (path,) = tmp_path.glob("passkey-1024-*.json")
    path.write_text("{not json")
    again = generate_samples("passkey", tasks_chat_tokenizer, 1024, 1, cache_dir=tmp_path)
    assert again == made and json.loads(path.read_text())["samples"][0] == made[0].to_dict()


# --- niah -----------------------------------------------------------------------------------------

SINGULAR_INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it."
    " I will quiz you about the number afterwards.\n"
)
PLURAL_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it."
    " I will quiz you about the numbers afterwards.\n"
)


def test_niah_single_noise_prompt_strings_and_needle_depth(generated):
    for sample in generated("niah_single_1", 1024):
        (key,), (value,) = sample.metadata["keys"], sample.references
        assert re.fullmatch(r"[1-9]\d{6}", value)
        assert sample.question == f"What is the special magic number for {key} mentioned in the provided text?"
        assert sample.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
        lines = haystack_lines(sample, SINGULAR_INTRO)
        needle = f"One of the special magic numbers for {key} is: {value}."
        units = sample.metadata["num_units"]
        assert sorted(lines) == sorted([NOISE] * units + [needle])
        assert sample.metadata["depths"] == [round(100 * lines.index(needle) / units, 2)]


def test_niah_multivalue_uses_the_plural_template(generated):
    sample = generated("niah_multivalue", 1024)[0]
    (key,) = sample.metadata["keys"]
    assert sample.context.startswith(PLURAL_INTRO)
    assert sample.question == f"What are all the special magic numbers for {key} mentioned in the provided text?"
    assert sample.answer_prefix == f" The special magic numbers for {key} mentioned in the provided text are"
    assert len(set(sample.references)) == 4
    for value in sample.references:
        assert sample.context.count(f"One of the special magic numbers for {key} is: {value}.") == 1


def test_niah_multiquery_joins_keys_and_orders_references(generated):
    sample = generated("niah_multiquery", 1024)[0]
    a, b, c, d = keys = sample.metadata["keys"]
    query = f"{a}, {b}, {c}, and {d}"
    assert sample.question == f"What are all the special magic numbers for {query} mentioned in the provided text?"
    assert sample.answer_prefix == f" The special magic numbers for {query} mentioned in the provided text are"
    for key, value in zip(keys, sample.references):
        assert f"One of the special magic numbers for {key} is: {value}." in sample.context


def test_niah_multikey_1_hides_three_distractor_needles(generated):
    sample = generated("niah_multikey_1", 1024)[0]
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.context)
    assert len(needles) == 4 and len({key for key, _ in needles}) == 4
    assert [value for key, value in needles if key == sample.metadata["keys"][0]] == sample.references


def test_niah_uuid_values_and_keys(generated):
    sample = generated("niah_single_3", 1024)[0]
    assert sample.question.startswith("What is the special magic uuid for ")
    assert uuid.UUID(sample.references[0]).version == 4
    needle_haystack = generated("niah_multikey_3", 1024)[0]
    lines = haystack_lines(needle_haystack, SINGULAR_INTRO.replace("number", "uuid"))
    assert len(lines) == needle_haystack.metadata["num_units"] + 1
    pattern = r"One of the special magic uuids for ([0-9a-f-]{36}) is: ([0-9a-f-]{36})\."
    pairs = [re.fullmatch(pattern, line).groups() for line in lines]
    (key,) = needle_haystack.metadata["keys"]
    assert [value for k, value in pairs if k == key] == needle_haystack.references
    assert uuid.UUID(key).version == 4 and len({k for k, _ in pairs}) == len(pairs)


def test_niah_needle_haystack_records_the_real_needle_depth(generated):
    for sample in generated("niah_multikey_2", 1024):
        lines = haystack_lines(sample, SINGULAR_INTRO)
        needle = f"One of the special magic numbers for {sample.metadata['keys'][0]} is: {sample.references[0]}."
        assert sample.metadata["depths"] == [round(100 * lines.index(needle) / sample.metadata["num_units"], 2)]


@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multivalue", "niah_single_2"])
def test_essay_needles_sit_at_their_recorded_depths(generated, task):
    for sample in generated(task, 4096):
        haystack = sample.context[sample.context.index("\n") + 1 : -1]
        needles = re.findall(r"One of the special magic numbers for \S+ is: \d+\.", haystack)
        sentences = split_sentences(essay_text(sample.metadata["num_units"]))
        depths = sample.metadata["depths"]
        assert len(needles) == len(depths) and depths == sorted(depths)
        for needle, depth in zip(needles, depths):
            assert depth in {round(100 * i / 39) for i in range(40)}
            before = haystack[: haystack.index(needle)]
            for other in needles:
                before = before.replace(other, " ")
            expected = sentences[: int(len(sentences) * depth / 100)]
            assert before.split() == " ".join(expected).split()


def test_essay_haystack_is_the_prose_in_order(generated):
    sample = generated("niah_single_2", 1024)[0]
    haystack = sample.context[sample.context.index("\n") + 1 : -1]
    prose = re.sub(r" ?One of the special magic numbers for \S+ is: \d+\.", "", haystack)
    assert prose.split() == essay_text(sample.metadata["num_units"]).split()


# --- vt -------------------------------------------------------------------------------------------

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def follow_chain(text: str, value: int) -> list[str]:
    """Variables that end up holding `value`, in assignment order."""
    holders: list[str] = []
    for line in text.split("\n"):
        direct = re.fullmatch(r"VAR ([A-Z]+) = (\d+)", line)
        copy = re.fullmatch(r"VAR ([A-Z]+) = VAR ([A-Z]+) ", line)
        if direct and int(direct.group(2)) == value:
            holders.append(direct.group(1))
        elif copy and copy.group(2) in holders:
            holders.append(copy.group(1))
    return holders


@pytest.mark.parametrize("length", LENGTHS)
def test_vt_chain_resolves_to_the_references(generated, length):
    for sample in generated("vt", length):
        value = sample.metadata["value"]
        assert sample.question == f"Question: Find all variables that are assigned the value {value} in the text above."
        assert sample.answer_prefix == (
            " Answer: According to the chain(s) of variable assignment in the text above,"
            f" 5 variables are assigned the value {value}, they are: "
        )
        example, main = sample.context.split("\n" + VT_INTRO)
        assert follow_chain(main, value) == sample.references
        assert all(re.fullmatch(r"[A-Z]{5}", name) for name in sample.references)
        lines = main[:-1].split("\n")
        assert [lines[i].split(" = ")[0] for i in sample.metadata["chain_lines"]] == [
            f"VAR {name}" for name in sample.references
        ]
        assert len(lines) == sample.metadata["num_units"] + 5

        example_value = int(re.search(r"assigned the value (\d+) in the text above", example).group(1))
        answer = re.search(r"they are: ([A-Z ]+)$", example).group(1).split(" ")
        assert example_value != value and 10000 <= example_value <= 99998
        assert example.startswith(VT_INTRO) and follow_chain(example, example_value) == answer
        assert len(answer) == 5 and all(len(name) == 3 for name in answer)


def test_vt_example_keeps_its_layout_with_new_names(generated):
    first, second = generated("vt", 1024)[:2]

    def masked(sample):
        example = sample.context.split("\n" + VT_INTRO)[0]
        return re.sub(r"\d{5}", "N", re.sub(r"\b[A-Z]{3}\b", "X", example))

    assert masked(first) == masked(second)
    assert first.context.split("\n" + VT_INTRO)[0] != second.context.split("\n" + VT_INTRO)[0]


# --- cwe and fwe ----------------------------------------------------------------------------------

CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others."
    " Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"


def numbered_words(text: str) -> list[str]:
    entries = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", text)
    assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
    return [word for _, word in entries]


@pytest.mark.parametrize("length, example_mix, main_mix", [(1024, (3, 1), (6, 1)), (4096, (10, 3), (30, 3))])
def test_cwe_references_are_the_most_common_words(generated, length, example_mix, main_mix):
    for sample in generated("cwe", length):
        assert (sample.question, sample.answer_prefix) == (CWE_QUESTION, CWE_ANSWER)
        shot, main = sample.context.split("\n" + CWE_INTRO)
        counts = Counter(numbered_words(main[:-1]))
        assert len(counts) == sample.metadata["num_units"]
        assert {w for w, c in counts.items() if c == main_mix[0]} == set(sample.references)
        assert len(sample.references) == 10 and set(counts.values()) == set(main_mix)

        shot_list, shot_answer = shot.removeprefix(CWE_INTRO).split("\n" + CWE_QUESTION + CWE_ANSWER + " ")
        shot_counts = Counter(numbered_words(shot_list))
        assert len(shot_counts) == (20 if length < 4096 else 40)
        assert set(numbered_words(shot_answer)) == {w for w, c in shot_counts.items() if c == example_mix[0]}
        assert not set(shot_counts) & set(counts)


@pytest.mark.parametrize("length", LENGTHS)
def test_fwe_references_are_the_three_most_frequent_coded_words(generated, length):
    head = (
        "Read the following coded text and track the frequency of each coded word."
        " Find the three most frequently appeared coded words. "
    )
    for sample in generated("fwe", length):
        assert sample.context.startswith(head) and sample.context.endswith("\n")
        assert sample.question == (
            "Question: Do not provide any explanation. Please ignore the dots '....'."
            " What are the three most frequently appeared words in the above coded text?"
        )
        assert sample.answer_prefix == (
            " Answer: According to the coded text above, the three most frequently appeared words are:"
        )
        ranked = Counter(sample.context[len(head) : -1].split(" ")).most_common()
        assert sample.metadata["vocabulary_size"] == (length - 50) // 50
        assert ranked[0][0] == "..." and len(ranked) <= sample.metadata["vocabulary_size"]
        assert [word for word, _ in ranked[1:4]] == sample.references
        assert ranked[3][1] > ranked[4][1]
        assert all(re.fullmatch(r"[a-z]{6}", word) for word, _ in ranked[1:])


# --- passkey --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_passkey_layout_and_depth(generated, length):
    for sample in generated("passkey", length):
        (key,) = sample.references
        assert re.fullmatch(r"[1-9]\d{4}", key)
        task, before, needle, after, end = sample.context.split("\n")
        assert task == (
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them."
            " I will quiz you about the important information there."
        )
        assert needle == f"The pass key is {key}. Remember it. {key} is the pass key." and end == ""
        assert (sample.question, sample.answer_prefix) == ("What is the pass key?", " The pass key is")
        units, depth = sample.metadata["num_units"], sample.metadata["depths"][0] / 100
        assert depth in {i / 10 for i in range(11)}
        assert before == " ".join([NOISE] * round(depth * units))
        assert after == " ".join([NOISE] * (units - round(depth * units)))
        assert score(sample, f" {key}.") == 1.0 and score(sample, f"{key}0") == 0.0
