"""The budget pays for a method's decode state (methods/common/budget.py): the tokens a head keeps are the most
whose keys, values and state fit b of the full cache, and a budget the state leaves no room in is refused in one
line naming the lowest one that works."""

import math
import re

import pytest

from kvbench.harness.errors import BudgetError
from kvbench.methods.common.budget import KEYS_AND_VALUES, TokenCost

CONTEXTS = [37, 400, 1024, 8191]
BUDGETS = [0.01, 0.05, 0.1, 0.25, 0.333, 0.5, 0.9]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("budget", BUDGETS + [1.0])
def test_without_state_a_head_keeps_int_b_n(context, budget):
    assert KEYS_AND_VALUES.tokens(context, budget) == int(context * budget)
    assert TokenCost(kv=3 * 2 * 64 * 2).tokens(context, budget) == int(context * budget)


# SmolLM2 in fp32 (30 layers × 3 KV heads, 512 bytes of key and value per token and head), with lightweight's and
# h2o's per-token state and uncomp's window of queries.
KV = 30 * 3 * 512
COSTS = [TokenCost(KV, state=30 * 3 * 24), TokenCost(KV, state=30 * 3 * 8), TokenCost(KV, fixed=30 * 9 * 8 * 64 * 4)]


@pytest.mark.parametrize("cost", COSTS, ids=["lightweight", "h2o", "uncomp"])
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_kept_tokens_and_state_fit_the_budget_with_no_room_for_one_more(cost, context, budget):
    tokens = cost.tokens(context, budget)
    allowed = budget * context * cost.kv
    assert 0 <= tokens <= int(context * budget)
    assert tokens == 0 or cost.held(tokens) <= allowed
    assert tokens == int(context * budget) or cost.held(tokens + 1) > allowed


def test_the_whole_context_keeps_no_state():
    """At b = 1 a method keeps every token and evicts nothing: no decode state, nothing to pay."""
    assert all(cost.tokens(400, 1.0) == 400 for cost in COSTS)


def test_the_split_on_smollm2():
    """lightweight's 24 bytes of state next to 512 of keys and values keep 512/536 of int(b·N)."""
    assert COSTS[0].tokens(1024, 0.25) == math.floor(0.25 * 1024 * 512 / 536) == 244
    assert COSTS[1].tokens(1024, 0.25) == math.floor(0.25 * 1024 * 512 / 520) == 252
    assert COSTS[2].tokens(1024, 0.25) == 256 - 12  # H_q·w/(2·H_kv) = 12 tokens' worth of queries


@pytest.mark.parametrize("cost", COSTS, ids=["lightweight", "h2o", "uncomp"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_refusal_is_one_line_naming_a_budget_that_is_reachable(cost, context):
    least = min(9, context)
    with pytest.raises(BudgetError, match="lowest reachable budget") as refusal:
        cost.kept("uncomp", context, 0.001, least, f"its window + 1 = {least}")
    assert "\n" not in str(refusal.value) and "decode state" in str(refusal.value)
    lowest = float(re.search(r"lowest reachable budget is ([0-9.]+)", str(refusal.value)).group(1))
    assert cost.kept("uncomp", context, lowest, least, "") >= least
    if lowest < 1:
        assert cost.tokens(context, round(lowest - 0.001, 3)) < least
