"""The offline long-generation task (`chain`): its samples recomputed from their own prompt text, its generation
allowance from its answer's tokens, and its exact checks on hand-written answers."""

import re

import pytest

from kvbench.tasks import generate_samples, split_prompt
from kvbench.tasks.metrics.chain import chain_operations, chain_steps

REFERENCES = ["step 1: add 8, x = 21", "step 2: subtract 4, x = 17", "step 3: add 5, x = 22"]


@pytest.mark.parametrize(
    "answer, steps, operations",
    [
        (" add 8, x = 21\nstep 2: subtract 4, x = 17\nstep 3: add 5, x = 22\nfinal: x = 22", 1.0, 1.0),
        (" add 8, x = 21\nstep 2: subtract 4, x = 18\nstep 3: add 6, x = 22", 2 / 3, 2 / 3),
        ("step 3: add 5, x = 22\nstep 3: add 5, x = 99", 1 / 3, 1 / 3),  # unnumbered opening: no step 1
        (" add 8, x = 21\nstep 2: add 4, x = 17", 2 / 3, 1 / 3),  # step 3 missing
        ("STEP 2 : Subtract 4 , x = 17", 1 / 3, 1 / 3),
        ("the answer is 22", 0.0, 0.0),
        (" add 8, x = 210", 0.0, 1 / 3),  # 210 is not 21
        (" add 8\nstep 2: subtract 4\nstep 3: add 5, x = 22", 1 / 3, 1.0),  # operations without values
    ],
)
def test_chain_checks_are_exact_per_step(answer, steps, operations):
    assert chain_steps(answer, REFERENCES) == pytest.approx(steps)
    assert chain_operations(answer, REFERENCES) == pytest.approx(operations)


def replay(context: str) -> list[str]:
    """The answer lines, recomputed from the prompt's own text: the start, then each listed operation in order."""
    x = int(re.search(r"Start with x = (\d+)\. Operations:", context).group(1))
    lines = []
    for step, verb, amount in re.findall(r"^(\d+)\. (add|subtract) (\d+)$", context, re.MULTILINE):
        x = x + int(amount) if verb == "add" else x - int(amount)
        lines.append(f"step {step}: {verb} {amount}, x = {x}")
    return lines


def test_chain_samples_replay_and_fit(tasks_chat_tokenizer):
    samples = generate_samples("chain", tasks_chat_tokenizer, 600, 3, seed=5)
    assert len({s.context for s in samples}) == 3
    for sample in samples:
        lines = replay(sample.context)
        assert lines == sample.references and len(lines) == sample.metadata["steps"] >= 4
        values = [int(line.rsplit("=", 1)[1]) for line in lines]
        assert all(0 <= v <= 99 for v in values)
        answer = "\n".join([*lines, f"final: x = {values[-1]}"])
        tokens = len(tasks_chat_tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert sample.max_new_tokens == tokens + tokens // 4 + 16
        parts = split_prompt(tasks_chat_tokenizer, sample.context, sample.question, sample.answer_prefix)
        assert len(parts.context_ids) + len(parts.question_ids) + sample.max_new_tokens <= 600
        assert chain_steps(answer, sample.references) == 1.0 == chain_operations(answer, sample.references)
    assert generate_samples("chain", tasks_chat_tokenizer, 600, 3, seed=5) == samples
