#!/usr/bin/env bash
# Build, verify and publish every release artifact of an elastic checkpoint.
#
# Usage: examples/ci/release.sh CHECKPOINT OUTPUT_ROOT
#
#   CHECKPOINT   a local checkpoint folder or a Hugging Face repo id (org/name)
#   OUTPUT_ROOT  a folder that does not exist yet, or is empty; it receives
#                  inspect.json               elastic inspect --json of the parent
#                  bf16/<budget>/             every budget sliced from the parent
#                  nvfp4-parent/              the parent quantized to NVFP4, still elastic
#                  nvfp4/<budget>/            every budget sliced from nvfp4-parent
#                  push/<artifact>.json       elastic push --json of each artifact
#
# Environment (all optional):
#   ELASTIC        command that runs elastic (default: elastic), such as "python -m elastic_cli"
#   PYTHON         Python interpreter used to read the JSON reports (default: python3)
#   REVISION       branch, tag or commit of a hub CHECKPOINT
#   CALIB_SAMPLES  calibration sequences for quantize (default: 16)
#   CALIB_SEQ_LEN  tokens per calibration sequence (default: 128)
#   CALIB_DATA     calibration text file (default: elastic's shipped text)
#   RECIPE         quantize recipe (default: nvidia)
#   REPO_PREFIX    target repos are REPO_PREFIX-<budget>-BF16, REPO_PREFIX-NVFP4 and
#                  REPO_PREFIX-<budget>-NVFP4 (default: example-org/<checkpoint name>)
#   PUSH           1 uploads for real; anything else runs elastic push --dry-run
#   HF_TOKEN       token with write access to REPO_PREFIX's namespace; required with PUSH=1
#   PUSH_PRIVATE   1 creates missing repos as private
#
# Every step stops the script on failure (set -e), so nothing is pushed unless every
# artifact has verified against its parent.

set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 CHECKPOINT OUTPUT_ROOT" >&2
    exit 2
fi
checkpoint=$1
out=$2

read -r -a elastic <<< "${ELASTIC:-elastic}"
python=${PYTHON:-python3}
calib_samples=${CALIB_SAMPLES:-16}
calib_seq_len=${CALIB_SEQ_LEN:-128}
recipe=${RECIPE:-nvidia}
repo_prefix=${REPO_PREFIX:-example-org/$(basename "$checkpoint")}

# These arrays may be empty. "${a[@]+"${a[@]}"}" expands an empty array to nothing under set -u,
# also in bash 3.2, where "${a[@]}" fails as an unbound variable.
revision_args=()
if [ -n "${REVISION:-}" ]; then
    revision_args=(--revision "$REVISION")
fi
calib_args=(--calib-samples "$calib_samples" --calib-seq-len "$calib_seq_len")
if [ -n "${CALIB_DATA:-}" ]; then
    calib_args+=(--calib-data "$CALIB_DATA")
fi
if [ "${PUSH:-0}" = "1" ]; then
    if [ -z "${HF_TOKEN:-}" ]; then
        echo "error: PUSH=1 needs HF_TOKEN, a token with write access to ${repo_prefix%%/*}" >&2
        exit 1
    fi
    push_args=()
    if [ "${PUSH_PRIVATE:-0}" = "1" ]; then
        push_args=(--private)
    fi
else
    push_args=(--dry-run)
fi

if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
    echo "error: output root $out is not empty. Pass a new or empty folder." >&2
    exit 1
fi
mkdir -p "$out/push"

step() {
    echo "==> $*" >&2
}

step "inspect $checkpoint"
"${elastic[@]}" inspect "$checkpoint" ${revision_args[@]+"${revision_args[@]}"} --json > "$out/inspect.json"
# Print the budget names, one per line, or fail when the masks are not nested and sliceable.
budgets=$("$python" - "$out/inspect.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1], encoding="utf-8"))
if not report["valid"]:
    for problem in report["problems"]:
        print(f"error: budget {problem['budget']}: {problem['message']}", file=sys.stderr)
    sys.exit(1)
for budget in report["budgets"]:
    print(budget["name"])
EOF
)
echo "budgets: $(echo "$budgets" | tr '\n' ' ')" >&2

step "slice every budget from the parent"
"${elastic[@]}" slice "$checkpoint" ${revision_args[@]+"${revision_args[@]}"} --budget all --output "$out/bf16"

step "quantize the parent to NVFP4 (recipe $recipe, $calib_samples x $calib_seq_len calibration tokens)"
"${elastic[@]}" quantize "$checkpoint" ${revision_args[@]+"${revision_args[@]}"} --format nvfp4 --recipe "$recipe" "${calib_args[@]}" \
    --output "$out/nvfp4-parent"

step "slice every budget from the NVFP4 parent"
"${elastic[@]}" slice "$out/nvfp4-parent" --budget all --output "$out/nvfp4"

step "verify every artifact against its parent"
for budget in $budgets; do
    "${elastic[@]}" verify "$out/bf16/$budget" --parent "$checkpoint" ${revision_args[@]+"${revision_args[@]}"}
done
"${elastic[@]}" verify "$out/nvfp4-parent" --parent "$checkpoint" ${revision_args[@]+"${revision_args[@]}"}
for budget in $budgets; do
    "${elastic[@]}" verify "$out/nvfp4/$budget" --parent "$out/nvfp4-parent"
done

if [ "${PUSH:-0}" = "1" ]; then
    step "push to $repo_prefix-*"
else
    step "push --dry-run to $repo_prefix-* (set PUSH=1 and HF_TOKEN to upload)"
fi
for budget in $budgets; do
    "${elastic[@]}" push "$out/bf16/$budget" "$repo_prefix-$budget-BF16" ${push_args[@]+"${push_args[@]}"} --json > "$out/push/$budget-BF16.json"
done
"${elastic[@]}" push "$out/nvfp4-parent" "$repo_prefix-NVFP4" ${push_args[@]+"${push_args[@]}"} --json > "$out/push/NVFP4.json"
for budget in $budgets; do
    "${elastic[@]}" push "$out/nvfp4/$budget" "$repo_prefix-$budget-NVFP4" ${push_args[@]+"${push_args[@]}"} --json > "$out/push/$budget-NVFP4.json"
done
step "done: artifacts in $out, push reports in $out/push"
