#!/usr/bin/env bash
# The GPU check: every check that needs a GPU, as one command that ends within its time budget and
# leaves its tables in $OUT (default bench/results/gpu_check), at most 8 files.
#
#   bench/gpu_check.sh --fetch                 where PyPI is: put what the GPU machine lacks into .gpu/
#                                              (wheels of webdataset, deepspeed and their needs; MNIST)
#   bench/gpu_check.sh [--budget SECONDS]      on the GPU machine, from the repository root (default 540)
#   bench/gpu_check.sh --dry-run [--budget S]  the same on a CPU at tiny sizes (default 1800; the suite runs it)
#
# On this project's GPU machine (the device tool), after --fetch here:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# .gpu/ is ignored by git (--fetch adds it to .git/info/exclude), so it travels only when carried.
#
# Phases, most informative first; each gets a deadline from the one budget (a phase that ends early
# leaves its time to the next), and the plan is printed first:
#   gpu tests        pytest -m "" tests/test_gpu.py: every user combination, capture vs eager, resume, ...
#   fused-op tests   pytest -m "" tests/test_fused_ops.py: the compiled Triton kernels against the reference
#   bench bf16/fp32  bench/bench_penalty.py: fused + captured vs eager per network, the penalty's overhead
#   stackedmnist     data + digit classifier, a bf16 run of the paper's conv nets (width 64), its modes and KL
#   compile          bench/bench_penalty.py --compile: torch.compile against capture
# Tests must all pass with none skipped or deselected; a failed phase does not stop the others; a test
# phase stopped at its deadline names in the summary the tests that had not finished (a hang's suspects).
# Expects torch, triton and accelerate installed (the GPU machine has torch 2.11); no network.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
GPU_DIR=${MEG_GPU_DIR:-$ROOT/.gpu}
# The project's virtual environment where there is one (a developer's machine), else the system's
# python3 (the GPU machine's holds torch).
default_python=python3
[[ -x $ROOT/.venv/bin/python ]] && default_python=$ROOT/.venv/bin/python
PYTHON=${PYTHON:-$default_python}

mode=run budget=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --fetch) mode=fetch ;;
        --dry-run) mode=dry ;;
        --budget) budget=${2:-}; shift ;;
        --budget=*) budget=${1#*=} ;;
        -h|--help) sed -n '2,/^# Expects/p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --fetch, --dry-run, --budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
[[ -z $budget ]] && budget=$([[ $mode == dry ]] && echo 1800 || echo 540)
if ! [[ $budget =~ ^[0-9]+$ ]] || (( budget < 60 )); then
    echo "gpu_check.sh: --budget wants whole seconds, at least 60 (got '$budget')" >&2
    exit 2
fi

T0=$(date +%s)  # the budget counts from here: installing the carried wheels is part of it

if [[ $mode == fetch ]]; then
    # Python 3.12 wheels for the GPU machine, at the versions of this project's environment;
    # deepspeed has no wheel on PyPI, so one is built here (pure Python: its ops compile at first use).
    set -e
    mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/mnist"
    grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$GPU_DIR/wheels" webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0
    "$PYTHON" -m pip wheel -q --no-deps -w "$GPU_DIR/wheels" deepspeed==0.19.8
    # MNIST from where the test suite reads real data: ../shared/data, else /work/shared/data.
    found=
    for dir in "$ROOT/../shared/data/mnist" /work/shared/data/mnist; do
        if [[ -f $dir/t10k-images-idx3-ubyte.gz && -f $dir/t10k-labels-idx1-ubyte.gz ]]; then
            cp "$dir"/t10k-images-idx3-ubyte.gz "$dir"/t10k-labels-idx1-ubyte.gz "$GPU_DIR/mnist/"
            found=$dir
            break
        fi
    done
    [[ -n $found ]] && echo "MNIST from $found" || echo "no MNIST files found: the StackedMNIST phase will be skipped" >&2
    du -sh "$GPU_DIR"
    exit 0
fi

# The interpreter first: without torch every phase would fail on its own, each with a traceback.
if ! "$PYTHON" -c "import torch, pytest" 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON cannot import torch and pytest: name an interpreter that has them" \
        "(PYTHON=/path/to/python bash bench/gpu_check.sh ...), or run ./launch.sh test once to make .venv" >&2
    exit 2
fi

if [[ $mode == run ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; run bench/gpu_check.sh --dry-run on a CPU" >&2
    exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# What the GPU machine lacks travels as wheels in .gpu/ (--fetch). A dry run whose interpreter lacks them
# too installs them the same way, so that the install is tried before a GPU's minutes are spent on it.
if ! "$PYTHON" -c "import webdataset, deepspeed" 2>/dev/null; then
    if ! compgen -G "$GPU_DIR/wheels/*.whl" >/dev/null; then
        echo "gpu_check.sh: $PYTHON lacks webdataset or deepspeed, and $GPU_DIR/wheels holds no wheels:" \
            "run bench/gpu_check.sh --fetch where PyPI is (with the GPU machine's Python, 3.12)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$GPU_DIR"/wheels/*.whl \
        || { echo "gpu_check.sh: installing the carried wheels of $GPU_DIR/wheels failed (see above)" >&2; exit 2; }
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    # Not a stop: on the GPU the other phases still have their say, and the tests that need them say why.
    if ! why=$("$PYTHON" -c "import webdataset, deepspeed" 2>&1); then
        echo "gpu_check.sh: warning: webdataset or deepspeed does not import from the carried wheels" \
            "($(tail -n 1 <<<"$why")); the tests that need them will fail; run --fetch again" >&2
    fi
fi

OUT=${OUT:-$ROOT/bench/results/gpu_check}
mkdir -p "$OUT"
summary=$OUT/summary.md
failed=0 not_run=0

# Where each phase must end, as a share (percent) of the budget from the start. Tiny sizes make the
# dry run's phases far cheaper than the real ones, so its larger default budget is pure margin for a
# loaded machine.
declare -A END=([tests]=38 [fused]=48 [bf16]=60 [fp32]=72 [smnist_data]=78 [smnist_run]=88 [smnist_eval]=95 [compile]=100)
PHASES=(tests fused bf16 fp32 smnist_data smnist_run smnist_eval compile)
declare -A NAME=([tests]="gpu tests" [fused]="fused-op tests" [bf16]="bench_penalty bf16" [fp32]="bench_penalty fp32"
    [smnist_data]="stackedmnist data" [smnist_run]="stackedmnist run" [smnist_eval]="stackedmnist evaluation"
    [compile]="bench_penalty compile vs capture")
deadline() { echo $(( T0 + budget * ${END[$1]} / 100 )); }

{
    echo "# GPU check ($mode) $(date -u +%FT%TZ)"
    echo
    echo "time budget ${budget} s; each phase ends by its deadline (seconds from the start):"
    prev=0
    for p in "${PHASES[@]}"; do
        end=$(( budget * ${END[$p]} / 100 ))
        echo "- ${NAME[$p]}: by ${end} s (its share $(( end - prev )) s, plus what earlier phases leave)"
        prev=$end
    done
    echo
} >"$summary"
cat "$summary"

if [[ $mode == dry ]]; then
    export MEG_GPU_DRY_RUN=1  # the gpu tests run on the CPU
    tiny=(--tiny --repeats 2 --iterations 1)
    # A fixed few steps (the real run trains until its deadline): the dry run ends as soon as it can.
    smnist=(model.conv_width=4 data.batch_size=16 train.energy_steps=2 log.every=5 train.steps=30
        eval.num_samples=500 eval.mala.steps=0)
    smnist_samples=2000 classifier_epochs=1 workers=2
else
    tiny=(--repeats 10 --iterations 3)
    smnist=(log.every=50)
    smnist_samples=26000 classifier_epochs=3 workers=4
fi
# The GPU tests' subprocess runs in parallel where pytest-xdist is (a dev dependency; the GPU machine
# has it): 4 workers share the GPU; on the dry run's CPU each run holds one core, so 2 workers.
xdist=()
"$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

"$PYTHON" - >>"$summary" 2>&1 <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"]
    print(subprocess.run(smi, capture_output=True, text=True).stdout.strip())
EOF
echo >>"$summary"

report() {  # report KEY STATUS DETAIL: one line in the summary and on stderr
    echo "- ${NAME[$1]}: $2${3:+ ($3)}" >>"$summary"
    echo "${NAME[$1]}: $2${3:+ ($3)}" >&2
}

PHASE_RC=0 PHASE_RAN=0
phase() {  # phase KEY LOGFILE COMMAND...: runs it until the phase's deadline, reports it, sets PHASE_RC and PHASE_RAN
    local key=$1 log=$2 start limit took
    shift 2
    start=$(date +%s)
    limit=$(( $(deadline "$key") - start ))
    if (( limit < 5 )); then
        report "$key" "NOT RUN" "the budget was spent before it"
        not_run=$(( not_run + 1 ))
        PHASE_RC=124 PHASE_RAN=0
        return
    fi
    PHASE_RAN=1
    echo "## ${NAME[$key]} (limit ${limit} s)" >>"$log"
    timeout -k 20 -s TERM "$limit" "$@" >>"$log" 2>&1
    PHASE_RC=$?
    took=$(( $(date +%s) - start ))
    if [[ $PHASE_RC -eq 0 ]]; then
        report "$key" "ok" "${took} s of ${limit} s"
    elif [[ $PHASE_RC -eq 124 || $PHASE_RC -eq 137 ]]; then
        report "$key" "FAILED" "stopped at its deadline after ${took} s; see $(basename "$log")"
        failed=1
    else
        report "$key" "FAILED" "exit $PHASE_RC after ${took} s; see $(basename "$log")"
        failed=1
    fi
}

unfinished_tests() {  # unfinished_tests TESTFILE < LOG: the file's tests with no outcome in LOG (a hang's suspects)
    local collected
    collected=$(timeout 120 "$PYTHON" -m pytest --collect-only -q -m "" -p no:cacheprovider "$1" 2>/dev/null \
        | grep '::')
    "$PYTHON" -c '
import re, sys
log = sys.stdin.read()
ended = set(re.findall(r"(\S+::\S+)(?= (?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)", log))
ended |= set(re.findall(r"(?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)", log))
if not sys.argv[1].split():
    print(f"  {sys.argv[2]}: which tests did not finish is unknown (pytest --collect-only failed)")
    sys.exit()
left = [t.split("::", 1)[1] for t in sys.argv[1].split() if t not in ended]
shown = ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
print(f"  {sys.argv[2]}: {len(left)} tests did not finish: {shown}" if left else f"  {sys.argv[2]}: every test ended")
' "$collected" "$1"
}

pytest_phase() {  # pytest_phase KEY TESTFILE: every test of the file runs and passes, none skipped or deselected
    local key=$1 file=$2 log=$OUT/tests.log before line
    before=$(cat "$log" 2>/dev/null | wc -l)
    # -m "": pyproject's default filter would deselect the gpu tests; -rfEs lists failures and skips;
    # -v logs each test's outcome as it ends, so a phase stopped at its deadline can name what was left.
    # Deterministic cuBLAS: the tests that compare captured with eager steps warm up on a side stream.
    CUBLAS_WORKSPACE_CONFIG=:4096:8 phase "$key" "$log" "$PYTHON" -m pytest -m "" -v -rfEs -p no:cacheprovider "${xdist[@]}" "$file"
    line=$(tail -n "+$(( before + 1 ))" "$log" | grep -E '^=*\s*[0-9]+ (passed|failed|error)' | tail -n 1 \
        | sed -E 's/^=+ //; s/ =+$//')
    echo "  $file: ${line:-no pytest summary line}" >>"$summary"
    # A phase that never started (NOT RUN) left no test unfinished.
    if [[ $PHASE_RAN -eq 1 && ( $PHASE_RC -eq 124 || $PHASE_RC -eq 137 ) ]]; then
        tail -n "+$(( before + 1 ))" "$log" | unfinished_tests "$file" >>"$summary"
    fi
    if [[ $PHASE_RC -eq 0 && ( -z $line || $line =~ (skipped|deselected|failed|error|xfail) ) ]]; then
        report "$key" "FAILED" "every test must run and pass"
        failed=1
    fi
}

pytest_phase tests tests/test_gpu.py
pytest_phase fused tests/test_fused_ops.py

# Penalty benchmarks, each table written row by row (a phase stopped at its deadline keeps its rows).
bench=(bench/bench_penalty.py "${tiny[@]}")
every=(--only stackedmnist --only toy --only cifar --only kdd)
phase bf16 "$OUT/bench.log" "$PYTHON" "${bench[@]}" "${every[@]}" --precision bf16 \
    --rows "before issue 10,no penalty,eager penalty,+ inputs/fused Adam,+ penalty kernel,+ capture,no penalty + capture,lazy k=4" \
    --out "$OUT/bench_penalty_bf16.md"
phase fp32 "$OUT/bench.log" "$PYTHON" "${bench[@]}" "${every[@]}" --out "$OUT/bench_penalty_fp32.md"

# StackedMNIST at the paper's width in bf16, then its modes and KL.
mnist=
for dir in "$GPU_DIR/mnist" "$ROOT/../shared/data/mnist" /work/shared/data/mnist; do
    [[ -f $dir/t10k-images-idx3-ubyte.gz ]] && { mnist=$dir; break; }
done
log=$OUT/stackedmnist.log
if [[ -n $mnist ]]; then
    images=$mnist/t10k-images-idx3-ubyte.gz labels=$mnist/t10k-labels-idx1-ubyte.gz
    phase smnist_data "$log" bash -c "
        '$PYTHON' -m data_pipeline.convert stackedmnist --images '$images' --labels '$labels' --n-stack 3 \
            --out '$WORK/smnist' &&
        '$PYTHON' -m data_pipeline.convert mnist --images '$images' --labels '$labels' --out '$WORK/mnist' &&
        '$PYTHON' -m trainer.classifier --data '$WORK/mnist' --out '$WORK/classifier.pt' --epochs $classifier_epochs"
    # Trains until SIGTERM a few seconds before its deadline: the trainer then checkpoints and exits
    # 75 (preempted), as under Slurm, leaving the evaluation a checkpoint.
    start=$(date +%s)
    seconds=$(( $(deadline smnist_run) - start - 15 ))
    if (( seconds < 20 )); then
        report smnist_run "NOT RUN" "the budget was spent before it"
        not_run=$(( not_run + 1 ))
    else
        echo "## ${NAME[smnist_run]} (SIGTERM after ${seconds} s)" >>"$log"
        timeout --preserve-status -k 30 -s TERM "$seconds" "$PYTHON" trainer/main.py --config stackedmnist \
            name=gpu_check output_dir="$WORK/run" data.url="$WORK/smnist" \
            eval.stackedmnist.classifier="$WORK/classifier.pt" train.mixed_precision=bf16 eval.every=0 \
            checkpoint.every=100000 log.prometheus_port=-1 "${smnist[@]}" >>"$log" 2>&1
        rc=$?
        took=$(( $(date +%s) - start ))
        if [[ $rc -eq 75 || $rc -eq 0 ]]; then
            report smnist_run "ok" "exit $rc after ${took} s"
        else
            report smnist_run "FAILED" "exit $rc after ${took} s; see stackedmnist.log"
            failed=1
        fi
    fi
    if [[ -d $WORK/run/checkpoints ]]; then
        phase smnist_eval "$log" "$PYTHON" -m trainer.evaluate --run "$WORK/run" \
            eval.stackedmnist.classifier="$WORK/classifier.pt" eval.num_samples=$smnist_samples eval.mala.steps=0
    else
        report smnist_eval "NOT RUN" "the run left no checkpoint"
        not_run=$(( not_run + 1 ))
    fi
    "$PYTHON" - "$WORK/run" >>"$summary" 2>&1 <<'EOF'
import glob, json, os, sys
run = sys.argv[1]
path = os.path.join(run, "metrics.jsonl")
train = [r for r in map(json.loads, open(path)) if "samples_per_s" in r] if os.path.exists(path) else []
evals = sorted(glob.glob(os.path.join(run, "eval", "eval_step_*.json")))
if train:
    last = train[-1]
    print(f"  stackedmnist: {last['step']} generator steps, {last['samples_per_s']:.0f} samples/s "
          f"(energy samples per second, last window), step time {last['step_time_s'] * 1e3:.1f} ms")
if evals:
    e = json.load(open(evals[-1]))
    print("  stackedmnist evaluation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in e.items() if k != "settings"))
EOF
else
    for key in smnist_data smnist_run smnist_eval; do
        report "$key" "NOT RUN" "no MNIST files: bench/gpu_check.sh --fetch copies them into .gpu/mnist"
        not_run=$(( not_run + 1 ))
    done
fi

phase compile "$OUT/bench.log" "$PYTHON" "${bench[@]}" --compile --only stackedmnist --only toy \
    --rows "eager penalty,+ inputs/fused Adam,+ capture,compile" --out "$OUT/bench_penalty_compile.md"

for table in "$OUT"/bench_penalty_{bf16,fp32,compile}.md; do
    [[ -f $table ]] && { echo; cat "$table"; } >>"$summary"
done
echo >>"$summary"
if [[ $failed -eq 0 && $not_run -eq 0 ]]; then
    echo "every phase passed ($(( $(date +%s) - T0 )) s of ${budget} s)" >>"$summary"
else
    echo "SOME PHASES FAILED OR DID NOT RUN ($(( $(date +%s) - T0 )) s of ${budget} s)" >>"$summary"
fi
cat "$summary"
exit $(( failed || not_run ))
