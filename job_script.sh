#!/usr/bin/env bash
# job_script.sh: run generate_data_finetuned.py as a SLURM job; an array job runs one shard
# per task. A requeued or restarted task resumes its shard (the Python script skips the
# custom_ids already in its output file), and a task about to hit its time limit gets USR1
# (--signal below), stops generating and requeues itself to carry on. It requeues only when
# it wrote a record since it started, or while SLURM_RESTART_COUNT is under
# DATAGEN_MAX_REQUEUES (default 3); otherwise it stops with an error instead of requeueing
# forever (a time limit too short to load the model and finish one batch).
#
# Single job (logs/ must exist before sbatch opens the log file in it):
#   mkdir -p logs
#   MODEL_NAME_OR_PATH=meta-llama/Llama-3.1-8B-Instruct ADAPTER_PATH=runs/lora-v3 \
#   INPUT_FILE=batchinput.jsonl OUTPUT_FILE=generations.jsonl BATCH_SIZE=32 sbatch job_script.sh
# (outside an array SLURM writes %a as 4294967294: add --output=logs/%x-%j.out for a tidier log name)
#
# Array of 8 shards (task K writes generations.shard-00K-of-008.jsonl):
#   MODEL_NAME_OR_PATH=... ADAPTER_PATH=... INPUT_FILE=batchinput.jsonl OUTPUT_FILE=generations.jsonl \
#   sbatch --array=0-7 job_script.sh
# N shards = SLURM_ARRAY_TASK_COUNT; a task's shard is its position in the array
# (generate_data_finetuned.py reads them; --array=1-8 or a %4 throttle work as well).
#
# Merge the shards once every task is done:
#   python reformat_results.py --input_file 'generations.shard-*.jsonl' --output_file reformatted.jsonl
#
# Settings: the flags of generate_data_finetuned.py as environment variables (upper case,
# SETTINGS below: MODEL_NAME_OR_PATH, ADAPTER_PATH, INPUT_FILE, OUTPUT_FILE, BATCH_SIZE,
# MAX_NEW_TOKENS, ...; switches DO_SAMPLE, NO_MERGE_LORA, TRUST_REMOTE_CODE, WITH_BASE,
# REGENERATE_MISMATCHED, IGNORE_UNSUPPORTED_FIELDS, NO_CACHE, REFRESH_CACHE take 1 or 0),
# and/or any flag after the script name, forwarded verbatim (repeat --stop for several):
#   sbatch job_script.sh --model_name_or_path BASE --input_file in.jsonl --output_file out.jsonl --stop '###'
# Only what is given is forwarded: every default lives in generate_data_finetuned.py. The
# flags after the script name come last, so they win over the same setting in the environment.
# Environment of the job itself:
#   PYTHON=INTERPRETER the interpreter (after VENV / MODULES are applied; default: the
#                      project's .venv/bin/python when it exists and VENV is unset, else python3)
#   VENV=DIR           source DIR/bin/activate first (only when set)
#   MODULES="a b"      `module load a b` first (only when set)
#   DATAGEN_DIR=DIR    where generate_data_finetuned.py is (default: this script's directory,
#                      found through `scontrol show job` since sbatch runs a copy of it)
#   DATAGEN_MAX_REQUEUES=N  (default 3) on USR1 a run that added a record to its output
#                      file(s) since it started always requeues; one that added none only
#                      while SLURM_RESTART_COUNT < N (0: never), else the job ends with an error
# Every argument after the script name reaches generate_data_finetuned.py unchanged (this
# script parses none of them), e.g. a stop string starting with '-': --stop=---
#
# Every #SBATCH line can be overridden on the command line, e.g.
#   sbatch --gres=gpu:a100:1 --mem=128G --time=1-00:00:00 --signal=B:USR1@600 job_script.sh
#   sbatch --gres=none ...     (a partition without GPUs)
# Outside SLURM, `bash job_script.sh ...` runs the same command here.
#SBATCH --job-name=datagen
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail

say() { echo "[job_script] $*"; }

# USR1, the time-limit warning, may come at any moment (SLURM may send it up to 60 s early,
# so with a short --time even before the generator starts): trap it first, act on it once
# the generator has stopped (or instead of starting it).
child=
usr1=0
on_usr1() {
    say "USR1 at $(date -u '+%H:%M:%SZ'): time limit near; stopping generation"
    usr1=1
    [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
}
trap on_usr1 USR1

# Environment variable -> flag of generate_data_finetuned.py (MAX_NEW_TOKENS -> --max_new_tokens).
SETTINGS=(MODEL_NAME_OR_PATH ADAPTER_PATH INPUT_FILE OUTPUT_FILE
          INPUT_FORMAT SPLIT PROMPT_FIELD MESSAGES_FIELD ID_FIELD PROMPT_TEMPLATE
          SYSTEM_PROMPT SYSTEM_PROMPT_FILE USE_CHAT_TEMPLATE
          MAX_NEW_TOKENS TEMPERATURE TOP_P SEED NUM_RETURN_SEQUENCES STOP
          BATCH_SIZE MAX_BATCH_TOKENS DTYPE DEVICE_MAP SHARD_INDEX NUM_SHARDS LOG_LEVEL
          ENGINE TENSOR_PARALLEL_SIZE GPU_MEMORY_UTILIZATION MAX_MODEL_LEN CACHE_DIR)
# Switches: VAR=1 forwards the first flag, VAR=0 the second (if any), unset/empty nothing.
declare -A SWITCH_ON=([DO_SAMPLE]=--do_sample [NO_MERGE_LORA]=--no_merge_lora [TRUST_REMOTE_CODE]=--trust_remote_code
                      [WITH_BASE]=--with_base
                      [REGENERATE_MISMATCHED]=--regenerate_mismatched
                      [IGNORE_UNSUPPORTED_FIELDS]=--ignore_unsupported_fields
                      [NO_CACHE]=--no_cache [REFRESH_CACHE]=--refresh_cache)
declare -A SWITCH_OFF=([DO_SAMPLE]=--no_do_sample)
SWITCHES=(DO_SAMPLE NO_MERGE_LORA TRUST_REMOTE_CODE WITH_BASE REGENERATE_MISMATCHED IGNORE_UNSUPPORTED_FIELDS
          NO_CACHE REFRESH_CACHE)
REQUIRED=(MODEL_NAME_OR_PATH INPUT_FILE)

usage() {
    {
        echo "usage: [SETTING=VALUE ...] sbatch [SBATCH OPTIONS] job_script.sh [generate_data_finetuned.py flags]"
        echo "   or: [SETTING=VALUE ...] bash job_script.sh [generate_data_finetuned.py flags]"
        echo "required, as environment variables or flags: MODEL_NAME_OR_PATH (--model_name_or_path)," \
            "INPUT_FILE (--input_file)"
        echo "settings (each forwarded as the lower-case flag, only when set):"
        echo "  ${SETTINGS[*]}" | fold -s -w 92 | sed '2,$s/^/  /'
        echo "switches (1 or 0): ${SWITCHES[*]}" | fold -s -w 92 | sed '2,$s/^/  /'
        echo "job: PYTHON (default python3), VENV, MODULES, DATAGEN_DIR, DATAGEN_MAX_REQUEUES (default 3);" \
            "examples in the header of job_script.sh"
    }
}

die_usage() {
    echo "job_script.sh: error: $*" >&2
    usage >&2
    exit 2
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi

# --- the command line ---------------------------------------------------------------------

lower() { tr '[:upper:]' '[:lower:]' <<<"$1"; }
flag_of() { echo "--$(lower "$1")"; }           # MAX_NEW_TOKENS -> --max_new_tokens

# True when FLAG is among the arguments (as --flag VALUE or --flag=VALUE).
given_as_argument() {
    local flag=$1 arg
    for arg in ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}; do
        case $arg in "$flag" | "$flag"=*) return 0 ;; esac
    done
    return 1
}

SCRIPT_ARGS=("$@")
forwarded=()
missing=()
for name in "${SETTINGS[@]}"; do
    if [[ -n ${!name:-} ]]; then
        forwarded+=("$(flag_of "$name")" "${!name}")
    fi
done
for name in "${SWITCHES[@]}"; do
    case $(lower "${!name:-}") in
        1 | true | yes | on) forwarded+=("${SWITCH_ON[$name]}") ;;
        0 | false | no | off) [[ -z ${SWITCH_OFF[$name]:-} ]] || forwarded+=("${SWITCH_OFF[$name]}") ;;
        "") ;;
        *) die_usage "$name='${!name}' is not a switch value (use 1 or 0)" ;;
    esac
done
for name in "${REQUIRED[@]}"; do
    [[ -n ${!name:-} ]] || given_as_argument "$(flag_of "$name")" || missing+=("$name")
done
if ((${#missing[@]})); then
    die_usage "missing required setting(s): ${missing[*]} (set them in the environment," \
        "e.g. ${missing[0]}=... sbatch job_script.sh, or pass $(flag_of "${missing[0]}") after the script name)"
fi
forwarded+=(${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"})
max_requeues=${DATAGEN_MAX_REQUEUES:-3}
[[ $max_requeues =~ ^[0-9]+$ ]] \
    || die_usage "DATAGEN_MAX_REQUEUES='$max_requeues' is not a number of requeues (use 0 or more; default 3)"

# --- where the code and the interpreter are -----------------------------------------------

find_datagen_dir() {
    if [[ -n ${DATAGEN_DIR:-} ]]; then echo "$DATAGEN_DIR"; return; fi
    local here command
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    if [[ -f $here/generate_data_finetuned.py ]]; then echo "$here"; return; fi
    # Under sbatch this file is a copy in slurmd's spool; the job record names the original.
    if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
        command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -1)
        if [[ -n $command && -f $(dirname "$command")/generate_data_finetuned.py ]]; then
            dirname "$command"; return
        fi
    fi
    echo "${SLURM_SUBMIT_DIR:-$PWD}"
}
datagen_dir=$(find_datagen_dir)
[[ -f $datagen_dir/generate_data_finetuned.py ]] \
    || die_usage "generate_data_finetuned.py not found in $datagen_dir (set DATAGEN_DIR to the project directory)"

if [[ -n ${MODULES:-} ]]; then
    type module >/dev/null 2>&1 || die_usage "MODULES='$MODULES' given but this shell has no 'module' command"
    # shellcheck disable=SC2086  # several modules, split on spaces on purpose
    module load $MODULES
fi
if [[ -n ${VENV:-} ]]; then
    [[ -f $VENV/bin/activate ]] || die_usage "VENV='$VENV' is not a virtual environment (no bin/activate)"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
if [[ -z ${PYTHON:-} && -z ${VENV:-} && -x $datagen_dir/.venv/bin/python ]]; then
    PYTHON=$datagen_dir/.venv/bin/python  # the project's own environment (make venv / make test)
fi
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die_usage "PYTHON='$PYTHON' is not an executable command"
if ! missing=$("$PYTHON" -c 'import importlib.util as u, sys
print(" ".join(m for m in ("torch", "transformers", "peft") if u.find_spec(m) is None))' 2>&1) || [[ -n $missing ]]; then
    echo "job_script.sh: error: $PYTHON cannot import ${missing:-the engine}; run make venv in $datagen_dir," \
        "or set VENV=DIR or PYTHON=INTERPRETER to an environment with requirements.txt installed" >&2
    exit 1
fi

# The files this task appends to (one per adapter, per shard), named as
# generate_data_finetuned.py names them, from its own parser: --output_file=X, --num_shards N,
# an array task all count. NUL-separated; nothing when the arguments do not parse (the
# generator then says why).
output_files() {
    "$PYTHON" - "$datagen_dir" "${forwarded[@]}" 2>/dev/null <<'PY'
import contextlib, sys
sys.path.insert(0, sys.argv[1])
from datagen.common import cli
from datagen.finetuned import generate_data_finetuned
try:
    with contextlib.redirect_stdout(sys.stderr):  # --help must not print a path
        parser = generate_data_finetuned.build_parser()
        args = parser.parse_args(cli.glue_dash_values(parser, sys.argv[2:]))
    for path in generate_data_finetuned.output_paths(args).values():
        print(path, end="\0")
except (SystemExit, Exception):
    sys.exit(1)
PY
}
# Complete records (lines) in the output files together; those not there yet count 0.
records_written() {
    local file total=0
    for file in ${outputs[@]+"${outputs[@]}"}; do
        [[ ! -f $file ]] || total=$((total + $(wc -l <"$file")))
    done
    echo "$total"
}
outputs=()
mapfile -d '' outputs < <(output_files) || true
records_at_start=$(records_written)

# --- what this task will do ---------------------------------------------------------------

say "job ${SLURM_JOB_ID:-none (not under SLURM)}, array job ${SLURM_ARRAY_JOB_ID:-none}," \
    "array task ${SLURM_ARRAY_TASK_ID:-none} of ${SLURM_ARRAY_TASK_COUNT:-none}," \
    "restart ${SLURM_RESTART_COUNT:-0}, host ${HOSTNAME:-$(uname -n)}, $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
say "python: $(command -v "$PYTHON") ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
say "settings (the rest take generate_data_finetuned.py's defaults):"
for name in "${SETTINGS[@]}" "${SWITCHES[@]}"; do
    [[ -z ${!name:-} ]] || say "  $name=${!name}"
done
for name in VENV MODULES CUDA_VISIBLE_DEVICES; do
    [[ -z ${!name:-} ]] || say "  $name=${!name}"
done
say "output: ${outputs[*]:-unknown} ($records_at_start records at start); on USR1 without a new record," \
    "requeue while restarts < $max_requeues (DATAGEN_MAX_REQUEUES)"
cmd=("$PYTHON" "$datagen_dir/generate_data_finetuned.py" "${forwarded[@]}")
say "command: $(printf '%q ' "${cmd[@]}")"

# --- run it, with signals handled ---------------------------------------------------------
# Bash runs a trap only between commands, so the generator runs in the background and this
# shell waits for it: `wait` returns as soon as a trapped signal arrives.

# SIGTERM (scancel, requeue, the end of the time limit) and Ctrl+C: a background child does
# not get them from this shell by itself (and ignores SIGINT), so pass them on.
on_stop() {
    say "$1: stopping generation (a rerun resumes where it stopped)"
    [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
    [[ -z $child ]] || wait "$child" 2>/dev/null || true
    exit "$2"
}
trap 'on_stop SIGTERM 143' TERM
trap 'on_stop SIGINT 130' INT

status=0
if ((usr1)); then
    say "USR1 came before the generator started: not starting it"
else
    "${cmd[@]}" &
    child=$!
    ((usr1 == 0)) || kill -TERM "$child" 2>/dev/null || true   # USR1 came before child=$!
    say "generator started (pid $child)"
    while :; do
        wait "$child" && status=0 || status=$?
        kill -0 "$child" 2>/dev/null || break        # still running: woken up by a signal
    done
    # An interrupted `wait` returns 128+signal; the child's own exit status is kept by bash.
    wait "$child" 2>/dev/null && status=0 || status=$?
fi

if ((usr1)); then
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        say "not under SLURM: nothing to requeue (generation stopped with status $status)"
        exit 1
    fi
    # An array task is named ARRAYJOB_TASK: the last task's own SLURM_JOB_ID equals the array's
    # id, and `scontrol requeue ARRAYJOB` would requeue every task of the array.
    target=$SLURM_JOB_ID
    [[ -z ${SLURM_ARRAY_JOB_ID:-} ]] || target=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    new=$(($(records_written) - records_at_start))
    restarts=${SLURM_RESTART_COUNT:-0}
    # Requeueing a run that cannot write one record before the signal would loop forever.
    if ((new <= 0 && restarts >= max_requeues)); then
        plural=s
        ((restarts != 1)) || plural=
        echo "job_script.sh: error: no new record since the last start and $restarts restart$plural already;" \
            "not requeueing: give the job more time (--time) or a smaller --batch_size" >&2
        exit 1
    fi
    say "generation stopped (status $status) with $((new > 0 ? new : 0)) new record(s) since the start" \
        "(restart $restarts); requeueing job $target to carry on"
    scontrol requeue "$target" && exit 0
    say "scontrol requeue $target failed; resubmit the same command to resume"
    exit 1
fi
say "generate_data_finetuned.py exited with status $status"
exit "$status"
