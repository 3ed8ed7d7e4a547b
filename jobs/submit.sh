#!/usr/bin/env bash
# Submit a vqpipe run (or decode) to a running Ray cluster as a Ray Job. See jobs/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: jobs/submit.sh [--address URL] [--no-wait] [--dry-run] [run|decode] CONFIG [ARGS...]

Submits `vqpipe run CONFIG ARGS...` (default) or `vqpipe decode CONFIG ARGS...` as a Ray Job:

  ray job submit --address URL --working-dir . --runtime-env jobs/runtime_env.yaml \
      -- vqpipe run CONFIG ARGS...

The repository is uploaded as the job's working directory and the command runs inside it, so
CONFIG is a path relative to the repository root (e.g. configs/laion.yaml). ARGS go to vqpipe
unchanged: dotted overrides (model.batch_size=128) and flags (--limit-shards 10, --num-samples 64).

Options:
  --address URL  the cluster's Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)
  --no-wait      return once submitted; follow with `ray job logs --follow JOB_ID`
  --dry-run      print the `ray job submit` command instead of running it
  -h, --help     show this help

Re-running the same command after a failure or preemption resumes: committed shards are skipped.
EOF
}

die() {
    echo "submit.sh: $*" >&2
    exit 2
}

address="${RAY_ADDRESS:-}"
dry_run=false
wait_flag=()
while (($# > 0)); do
    case "$1" in
        --address) (($# >= 2)) || die "--address needs a value"; address="$2"; shift 2 ;;
        --address=*) address="${1#--address=}"; shift ;;
        --no-wait) wait_flag=(--no-wait); shift ;;
        --dry-run) dry_run=true; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (options go before the mode and CONFIG; see --help)" ;;
        *) break ;;
    esac
done

mode=run
if (($# > 0)) && [[ "$1" == run || "$1" == decode ]]; then
    mode="$1"
    shift
fi
(($# > 0)) || die "missing CONFIG (see --help)"
config="$1"
shift

# The working dir is the repository root, wherever this script is called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ "$config" != /* ]] || die "CONFIG must be relative to the repository root (it travels with --working-dir): $config"
[[ -f "$config" ]] || die "no such config in the repository: $config"
[[ -n "$address" ]] || die "no Ray address: pass --address http://HEAD:8265 or set RAY_ADDRESS"

cmd=(ray job submit --address "$address" "${wait_flag[@]}" --working-dir . --runtime-env jobs/runtime_env.yaml
    -- vqpipe "$mode" "$config" "$@")

if $dry_run; then
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
    exit 0
fi
# Ray 2.60's CLI sends a token only when RAY_AUTH_MODE=token is set: with the token in hand but the
# mode unset, `ray job submit` fails with a long traceback that says the mode is 'disabled'.
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
token_from=""  # where the token is, never the token itself
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then token_from=RAY_AUTH_TOKEN; elif [[ -f "$token_file" ]]; then token_from="$token_file"; fi
if [[ -z "${RAY_AUTH_MODE:-}" && -n "$token_from" ]]; then
    die "a Ray auth token is set ($token_from) but RAY_AUTH_MODE is not, so ray would not send it: export RAY_AUTH_MODE=token (or RAY_AUTH_MODE=disabled for a cluster without auth)"
fi
command -v ray >/dev/null || die "the ray CLI is not installed here: pip install 'ray[default]'"
exec "${cmd[@]}"
