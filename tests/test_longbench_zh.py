"""LongBench's Chinese subsets and InfiniteBench's longbook_qa_chn: each metric on hand-worked examples from the
official definitions (THUDM/LongBench `metrics.py`, OpenBMB/InfiniteBench `compute_scores.py`), the prompts
against the official templates written out here, the first-line and no-chat-template rules, the report's
English / Chinese / overall averages, and every new task end to end through `kvbench run` on a tiny model."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
from dataset_fixtures import isolate_caches, write_jsonl

from kvbench.harness.cli.commands import main
from kvbench.tasks.metrics import longbench as lb
from kvbench.tasks.metrics.infinitebench import infbench_qa_f1_zh
from kvbench.tasks.metrics.scoring import BENCHMARK_METRICS


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    return isolate_caches(tmp_path, monkeypatch)


# --- jieba and the normalisation -------------------------------------------------------------------------------


def test_jieba_segments_from_its_bundled_dictionary_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("jieba opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    import jieba

    fresh = jieba.Tokenizer()  # a new one loads its dictionary here, whatever an earlier test loaded
    fresh.initialize()
    assert fresh.initialized and list(fresh.cut("预算和计划", cut_all=False)) == ["预算", "和", "计划"]
    # accurate mode: the words a Chinese reader would cut
    assert lb.jieba_words("会议讨论了预算和计划") == ["会议", "讨论", "了", "预算", "和", "计划"]
    assert lb.jieba_words("答案是北京。") == ["答案", "是", "北京", "。"]


def test_normalize_zh_answer_drops_both_punctuations_and_all_whitespace():
    # "，" "！" and "“”" are in LongBench's Chinese list, "?" in string.punctuation; spaces go; letters lower-cased;
    # unlike the English normalisation, "the" stays (no articles rule)
    assert lb.normalize_zh_answer("  你好，World！ “the” 答案? ") == "你好worldthe答案"


# --- LongBench's Chinese metrics -------------------------------------------------------------------------------


def test_qa_f1_zh_on_jieba_words():
    # prediction words 答案 / 是 / 北京 / 。 -> "。" normalises to "" and is dropped: 3 words; reference: 北京.
    # common 1: P = 1/3, R = 1/1, F1 = 2 * (1/3) / (1/3 + 1) = 0.5
    assert lb.longbench_qa_f1_zh("答案是北京。", ["北京"]) == pytest.approx(0.5)
    # best over references: the second one is the prediction itself
    assert lb.longbench_qa_f1_zh("答案是北京。", ["上海", "答案是北京"]) == pytest.approx(1.0)
    # words, not characters: 北京 and 北 share a character but no word
    assert lb.longbench_qa_f1_zh("北京", ["北"]) == 0.0
    assert lb.longbench_qa_f1_zh("。", ["北京"]) == 0.0  # nothing left after normalising


def test_rouge_zh_is_rouge_l_over_jieba_words():
    # prediction words 会议 讨论 了 预算 和 计划 (6), reference 会议 讨论 了 计划 (4): LCS 4 (会议 讨论 了 计划)
    # P = 4/6, R = 4/4, F = 2 * (2/3) / (2/3 + 1) = 0.8
    assert lb.longbench_rouge_zh("会议讨论了预算和计划", ["会议讨论了计划"]) == pytest.approx(0.8)
    # the English subsets' tokenizer keeps only [a-z0-9]: on Chinese text it sees no words and scores 0
    assert lb.longbench_rouge("会议讨论了预算和计划", ["会议讨论了计划"]) == 0.0
    assert lb.longbench_rouge_zh("", ["会议讨论了计划"]) == 0.0  # the `rouge` package raises: 0


def test_retrieval_zh_reads_the_paragraph_number_after_duanluo():
    # reference 段落3 -> 3; prediction numbers 3 and 12: one of two is right
    assert lb.longbench_retrieval_zh("答案是：段落3，不是段落12", ["段落3"]) == pytest.approx(0.5)
    assert lb.longbench_retrieval_zh("段落3", ["段落3"]) == 1.0
    assert lb.longbench_retrieval_zh("不知道", ["段落3"]) == 0.0  # no number at all
    with pytest.raises(Exception, match="段落N"):
        lb.longbench_retrieval_zh("段落3", ["Paragraph 3"])  # the English pattern is not the Chinese one


def test_lsht_classification_with_chinese_classes_and_the_first_line():
    classes = ["体育", "财经", "国际", "国际财经"]
    # first line only (lsht is in the first-line set): "财经" alone is named -> 1
    assert "lsht" in lb.FIRST_LINE_SUBSETS
    assert lb.longbench_classification("\n财经\n体育", ["财经"], first_line=True, all_classes=classes) == 1.0
    # the whole output names 体育 and 财经: 1/2
    assert lb.longbench_classification("财经\n体育", ["财经"], first_line=False, all_classes=classes) == 0.5
    # 国际财经 names 财经, 国际 and 国际财经; 财经 is a proper substring of the reference and is removed, and the
    # class right after it in the list (国际) is stepped over by LongBench's remove-while-iterating: 1/2
    assert lb.longbench_classification("国际财经", ["国际财经"], all_classes=classes) == 0.5


def test_longbook_qa_chn_is_character_f1():
    # 答案：鲁迅先生 -> "答案鲁迅先生" (6 characters, the colon dropped) vs 鲁迅 (2): common 2
    # P = 2/6, R = 2/2, F1 = 2 * (1/3) / (1/3 + 1) = 0.5
    assert infbench_qa_f1_zh("答案：鲁迅先生", ["鲁迅"]) == pytest.approx(0.5)
    # characters, not words: 北 is one of 北京's two characters: P = 1/2, R = 1 -> 2/3
    assert infbench_qa_f1_zh("北京", ["北"]) == pytest.approx(2 / 3)
    assert infbench_qa_f1_zh("上海", ["北京", "京城"]) == 0.0


def test_the_metrics_are_registered():
    for name in ("longbench_qa_f1_zh", "longbench_rouge_zh", "longbench_retrieval_zh", "infbench_qa_f1_zh"):
        assert name in BENCHMARK_METRICS


# --- prompts ---------------------------------------------------------------------------------------------------

CONTEXT = "段落1：北京是中国的首都，也是政治和文化中心。\n\n段落2：上海是中国最大的经济城市。"


def zh_record(subset, i=0):
    answers = {
        "multifieldqa_zh": ["北京"],
        "dureader": ["北京是中国的首都"],
        "vcsum": ["会议讨论了北京和上海"],
        "lsht": ["财经"],
        "passage_retrieval_zh": ["段落1"],
    }[subset]
    return {
        "input": "中国的首都是哪里？" if subset != "lsht" else "新闻：股市今天上涨。\n类别：",
        "context": CONTEXT,
        "answers": answers,
        "length": 60 + i,
        "dataset": subset,
        "language": "zh",
        "all_classes": ["体育", "财经", "国际"] if subset == "lsht" else None,
        "_id": f"zh{i}",
    }


def test_chinese_prompts_follow_dataset2prompt_and_dataset2maxlen():
    from kvbench.tasks.datasets.catalog import records_to_samples

    (sample,) = records_to_samples("longbench:passage_retrieval_zh", [zh_record("passage_retrieval_zh")], "fixture")
    # config/dataset2prompt.json's passage_retrieval_zh template, cut at {context}
    assert sample.context == "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n" + CONTEXT
    assert sample.question == (
        '\n\n下面是一个摘要\n\n中国的首都是哪里？\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    )
    assert (sample.max_new_tokens, sample.metric) == (32, "longbench_retrieval_zh")
    (mf,) = records_to_samples("longbench:multifieldqa_zh", [zh_record("multifieldqa_zh")], "fixture")
    assert mf.context == "阅读以下文字并用中文简短回答：\n\n" + CONTEXT
    assert mf.question == (
        "\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：中国的首都是哪里？\n回答："
    )
    assert (mf.max_new_tokens, mf.metric) == (64, "longbench_qa_f1_zh")
    (du,) = records_to_samples("longbench:dureader", [zh_record("dureader")], "fixture")
    assert du.context == "请基于给定的文章回答下述问题。\n\n文章：" + CONTEXT
    assert du.question == "\n\n请基于上述文章回答下面的问题。\n\n问题：中国的首都是哪里？\n回答："
    assert (du.max_new_tokens, du.metric) == (128, "longbench_rouge_zh")
    (vc,) = records_to_samples("longbench:vcsum", [zh_record("vcsum")], "fixture")
    assert vc.context == "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n" + CONTEXT
    assert vc.question == "\n\n会议总结："
    assert (vc.max_new_tokens, vc.metric) == (512, "longbench_rouge_zh")
    # every Chinese subset but lsht is chat-templated and scored on the whole output
    for chat in (sample, mf, du, vc):
        assert chat.metadata["chat_template"] is True and chat.metadata["metric_options"] == {"first_line": False}


def test_lsht_has_no_chat_template_and_scores_the_first_line(tasks_chat_tokenizer):
    from kvbench.tasks.datasets.catalog import records_to_samples
    from kvbench.tasks.datasets.lengths import sample_prompt

    (lsht,) = records_to_samples("longbench:lsht", [zh_record("lsht")], "fixture")
    assert lsht.context == "请判断给定新闻的类别，下面是一些例子。\n\n" + CONTEXT
    assert lsht.question == "\n新闻：股市今天上涨。\n类别："
    assert (lsht.max_new_tokens, lsht.metric) == (64, "longbench_classification")
    assert lsht.metadata["chat_template"] is False  # pred.py: few-shot subsets go without the chat template
    assert lsht.metadata["metric_options"] == {"first_line": True, "all_classes": ["体育", "财经", "国际"]}
    parts = sample_prompt(tasks_chat_tokenizer, lsht)
    assert parts.context_text == "<s>" + lsht.context and parts.question_text == lsht.question


def test_longbook_qa_chn_prompt_follows_the_open_model_template():
    from kvbench.tasks.datasets.catalog import records_to_samples

    record = {"id": 0, "context": CONTEXT, "input": "中国的首都是哪里？", "answer": ["北京"], "options": []}
    (sample,) = records_to_samples("infinitebench:longbook_qa_chn", [record], "fixture")
    # src/prompt.py yarn_mistral_templates["longbook_qa_chn"], cut at {context}
    assert sample.context == "阅读以下书籍然后回答问题。\n\n" + CONTEXT
    assert sample.question == "\n\n问题：中国的首都是哪里？\n答案："
    assert (sample.max_new_tokens, sample.metric, sample.references) == (40, "infbench_qa_f1_zh", ["北京"])


def test_longbench_e_has_no_chinese_subset():
    from kvbench.tasks.datasets.catalog import parse_task

    with pytest.raises(Exception, match="unknown longbench_e subset"):
        parse_task("longbench_e:dureader")


# --- report ----------------------------------------------------------------------------------------------------


def report_row(task, sample_id, score):
    return {
        "task": task, "sample_id": sample_id, "method": "full", "method_label": "full", "budget": 1.0,
        "score": score, "length": 4096, "metric": "m", "dataset": "longbench", "label": "full",
    }  # fmt: skip


def test_report_gives_english_chinese_and_overall_averages():
    from kvbench.reports import benchmarks

    rows = pd.DataFrame(
        [
            # English: hotpotqa 100, 0 -> 50; trec 100 -> 100; English average (50 + 100) / 2 = 75
            report_row("longbench:hotpotqa", 0, 100.0),
            report_row("longbench:hotpotqa", 1, 0.0),
            report_row("longbench:trec", 0, 100.0),
            # Chinese: dureader 20 -> 20; lsht 0 -> 0; Chinese average 10
            report_row("longbench:dureader", 0, 20.0),
            report_row("longbench:lsht", 0, 0.0),
        ]
    )
    table = benchmarks.longbench(rows).set_index("method_label")
    assert table.loc["full", "average_en"] == pytest.approx(75.0)
    assert table.loc["full", "average_zh"] == pytest.approx(10.0)
    # overall: the four subsets weigh the same, (50 + 100 + 20 + 0) / 4 = 42.5 (not the mean of 75 and 10)
    assert table.loc["full", "average"] == pytest.approx(42.5)
    english_only = benchmarks.longbench(rows[~rows["task"].isin(["longbench:dureader", "longbench:lsht"])])
    assert "average_en" not in english_only.columns and "average_zh" not in english_only.columns


# --- end to end ------------------------------------------------------------------------------------------------

ZH_TASKS = {
    "longbench:multifieldqa_zh": "longbench_qa_f1_zh",
    "longbench:dureader": "longbench_rouge_zh",
    "longbench:vcsum": "longbench_rouge_zh",
    "longbench:lsht": "longbench_classification",
    "longbench:passage_retrieval_zh": "longbench_retrieval_zh",
    "infinitebench:longbook_qa_chn": "infbench_qa_f1_zh",
}


def test_every_chinese_task_runs_end_to_end(chat_model_dir, tmp_path):
    data = tmp_path / "data"
    for task in ZH_TASKS:
        dataset, subset = task.split(":")
        if dataset == "longbench":
            write_jsonl(data / "longbench" / f"{subset}.jsonl", [zh_record(subset)])
    write_jsonl(
        data / "infinitebench" / "longbook_qa_chn.jsonl",
        [{"id": 0, "context": CONTEXT, "input": "中国的首都是哪里？", "answer": ["北京"], "options": []}],
    )
    out = tmp_path / "run"
    args = [
        "run", "--model", chat_model_dir, "--methods", "full,streaming_llm", "--budgets", "0.5",
        "--tasks", ",".join(ZH_TASKS), "--samples", "1", "--lengths", "600", "--out", str(out), "--no-progress",
        "--no-report", "--batch-size", "2", f"--data=longbench={data / 'longbench'}",
        f"--data=infinitebench={data / 'infinitebench'}",
    ]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    assert set(by_task) == set(ZH_TASKS)
    for task, task_rows in by_task.items():
        assert len(task_rows) == 2  # one sample x (full, streaming_llm@0.5)
        for row in task_rows:
            assert row["metric"] == ZH_TASKS[task]
            assert "error" not in row and 0 <= row["score"] <= 100
            assert row["sample_tokens"] <= 600
    # the score each row holds is the metric's own on the row's output and references (x100)
    for row in by_task["longbench:lsht"]:
        expected = lb.longbench_classification(
            row["output"], row["references"], first_line=True, all_classes=["体育", "财经", "国际"]
        )
        assert row["score"] == pytest.approx(100 * expected, abs=0.005)  # rows round to 2 places
