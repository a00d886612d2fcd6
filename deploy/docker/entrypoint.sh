#!/usr/bin/env bash
# Container entrypoint: `vllm serve "$MODEL"` with the plugin's --kv-* flags taken from the
# environment. The flags are validated by the plugin's own parser first, so a bad value stops
# the container at once with the plugin's message, before vLLM loads anything.
#
#   MODEL (required)          model path or Hugging Face id
#   KV_EVICTION KV_BUDGET KV_SINK_TOKENS KV_WINDOW KV_SLACK KV_POLICY_ARGS
#   KV_REQUEST_OVERRIDE KV_ALLOWED_POLICIES KV_BUDGET_MIN KV_BUDGET_MAX
#                             one --kv-* flag each (unset or empty: the plugin's default)
#   ADDITIONAL_CONFIG         JSON for --additional-config, e.g. from deploy/kubernetes' ConfigMap
#   HOST PORT                 default 0.0.0.0 8000
#   EXTRA                     more `vllm serve` arguments, split on whitespace (arguments given
#                             to the container are appended as they are)
#   DRY_RUN=1                 print the command instead of running it
set -euo pipefail
: "${MODEL:?set MODEL to a model path or Hugging Face id}"
PYTHON=${PYTHON:-python3}

args=()
flag() {  # flag ENV_NAME --flag: pass the variable's value if it is set and not empty
  if [ -n "${!1:-}" ]; then args+=("$2" "${!1}"); fi
}
flag KV_EVICTION --kv-eviction
flag KV_BUDGET --kv-budget
flag KV_SINK_TOKENS --kv-sink-tokens
flag KV_WINDOW --kv-window
flag KV_SLACK --kv-slack
flag KV_POLICY_ARGS --kv-policy-args
flag KV_REQUEST_OVERRIDE --kv-request-override
flag KV_ALLOWED_POLICIES --kv-allowed-policies
flag KV_BUDGET_MIN --kv-budget-min
flag KV_BUDGET_MAX --kv-budget-max
flag ADDITIONAL_CONFIG --additional-config

# The same parser and validation `vllm serve` applies, without importing vLLM (a second or so).
"$PYTHON" -m vllm_evict --check "${args[@]}" >&2

read -r -a extra <<< "${EXTRA:-}"
cmd=(vllm serve "$MODEL" --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}"
     "${args[@]}" "${extra[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
