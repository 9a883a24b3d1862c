#!/usr/bin/env bash
# Every check that needs a GPU, as one script that ends within about 8 minutes on an H100/H200 and
# writes its tables under $OUT (default: bench/results/gpu_check).
#
#   bench/gpu_check.sh --fetch     on a machine with PyPI: put what the GPU machine lacks into .gpu/
#                                  (wheels of webdataset, deepspeed and their needs; the MNIST files)
#   bench/gpu_check.sh             on the GPU machine, from the repository root, with .gpu/ beside it
#   bench/gpu_check.sh --dry-run   the same on a CPU at tiny sizes (the test suite runs this)
#
# Phases: the device's versions; the GPU tests (pytest tests/test_gpu.py tests/test_fused_ops.py); the
# penalty benchmark in fp32 and bf16 and torch.compile against capture; bench_steps; a StackedMNIST
# run of the paper's conv nets (width 64) in bf16 for 2 minutes, then its modes and KL. Each phase has
# its own time limit and a failed phase does not stop the others; summary.md says what passed.
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

mode=run
case "${1:-}" in
    --fetch) mode=fetch ;;
    --dry-run) mode=dry ;;
    "") ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (use --fetch, --dry-run or nothing)" >&2; exit 2 ;;
esac

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
    cp ../shared/data/mnist/t10k-images-idx3-ubyte.gz ../shared/data/mnist/t10k-labels-idx1-ubyte.gz "$GPU_DIR/mnist/"
    du -sh "$GPU_DIR"
    exit 0
fi

OUT=${OUT:-$ROOT/bench/results/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
summary=$OUT/summary.md
echo "# GPU check ($mode) $(date -u +%FT%TZ)" >"$summary"
failed=0

phase() {  # phase NAME SECONDS LOGFILE COMMAND...: runs with a time limit, appends to the log and summary
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    start=$(date +%s)
    echo "## $name" >>"$log"
    timeout -s TERM "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        echo "- $name: ok (${took} s)" >>"$summary"
    else
        echo "- $name: FAILED, exit $rc (${took} s; see $(basename "$log"))" >>"$summary"
        failed=1
    fi
    echo "$name: exit $rc after ${took} s" >&2
}

if [[ $mode == dry ]]; then
    export MEG_GPU_DRY_RUN=1   # the gpu tests run on the CPU
    tiny=(--tiny --repeats 2 --iterations 1)
    smnist=(model.conv_width=4 data.batch_size=16 train.energy_steps=2 log.every=5)
    smnist_seconds=25 smnist_samples=2000 classifier_epochs=1 steps_repeats=(--repeats 1 --only toy)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA device here; run bench/gpu_check.sh --dry-run on a CPU" >&2
        exit 2
    fi
    if ! "$PYTHON" -c "import webdataset, deepspeed" 2>/dev/null; then
        [[ -d $GPU_DIR/wheels ]] || { echo "gpu_check.sh: $GPU_DIR/wheels missing: run --fetch where PyPI is" >&2; exit 2; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$GPU_DIR"/wheels/*.whl \
            || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 2; }
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    tiny=(--repeats 20 --iterations 5)
    smnist=(log.every=100)
    smnist_seconds=120 smnist_samples=26000 classifier_epochs=3 steps_repeats=(--repeats 20)
fi
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

phase "gpu tests" 330 "$OUT/pytest.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused_ops.py
bench=(bench/bench_penalty.py "${tiny[@]}")
phase "bench_penalty fp32" 150 "$OUT/bench_penalty.log" "$PYTHON" "${bench[@]}" --out "$OUT/bench_penalty_fp32.md"
phase "bench_penalty bf16" 150 "$OUT/bench_penalty.log" "$PYTHON" "${bench[@]}" --precision bf16 \
    --rows "before issue 10,no penalty,eager penalty,+ inputs/fused Adam,+ penalty kernel,+ capture,lazy k=4" \
    --out "$OUT/bench_penalty_bf16.md"
phase "bench_penalty compile vs capture" 150 "$OUT/bench_penalty.log" "$PYTHON" "${bench[@]}" --compile \
    --only stackedmnist --only toy --rows "eager penalty,+ inputs/fused Adam,+ capture,compile" \
    --out "$OUT/bench_penalty_compile.md"
phase "bench_steps" 90 "$OUT/bench_steps.log" "$PYTHON" bench/bench_steps.py "${steps_repeats[@]}"

# StackedMNIST at the paper's width in bf16 for a fixed time, then its modes and KL.
mnist=
for dir in "$GPU_DIR/mnist" "$ROOT/../shared/data/mnist" /work/shared/data/mnist; do
    [[ -f $dir/t10k-images-idx3-ubyte.gz ]] && { mnist=$dir; break; }
done
if [[ -n $mnist ]]; then
    images=$mnist/t10k-images-idx3-ubyte.gz labels=$mnist/t10k-labels-idx1-ubyte.gz
    log=$OUT/stackedmnist.log
    phase "stackedmnist data" 120 "$log" bash -c "
        '$PYTHON' -m data_pipeline.convert stackedmnist --images '$images' --labels '$labels' --n-stack 3 \
            --out '$WORK/smnist' &&
        '$PYTHON' -m data_pipeline.convert mnist --images '$images' --labels '$labels' --out '$WORK/mnist' &&
        '$PYTHON' -m trainer.classifier --data '$WORK/mnist' --out '$WORK/classifier.pt' --epochs $classifier_epochs"
    # SIGTERM after the time limit: the trainer checkpoints and exits 75 (preempted), as under Slurm.
    start=$(date +%s)
    timeout --preserve-status -k 60 -s TERM "$smnist_seconds" "$PYTHON" trainer/main.py --config stackedmnist name=gpu_check \
        output_dir="$WORK/run" data.url="$WORK/smnist" eval.stackedmnist.classifier="$WORK/classifier.pt" \
        train.mixed_precision=bf16 eval.every=0 \
        checkpoint.every=100000 log.prometheus_port=-1 "${smnist[@]}" >>"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    if [[ $rc -eq 75 || $rc -eq 0 ]]; then
        echo "- stackedmnist run: ok, stopped by SIGTERM after ${took} s (exit $rc)" >>"$summary"
    else
        echo "- stackedmnist run: FAILED, exit $rc (${took} s; see stackedmnist.log)" >>"$summary"
        failed=1
    fi
    phase "stackedmnist evaluation" 120 "$log" "$PYTHON" -m trainer.evaluate --run "$WORK/run" \
        eval.stackedmnist.classifier="$WORK/classifier.pt" eval.num_samples=$smnist_samples eval.mala.steps=0
    "$PYTHON" - "$WORK/run" >>"$summary" 2>&1 <<'EOF'
import glob, json, os, sys
run = sys.argv[1]
train = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "samples_per_s" in r]
evals = sorted(glob.glob(os.path.join(run, "eval", "eval_step_*.json")))
if train:
    last = train[-1]
    print(f"- stackedmnist: {last['step']} generator steps, {last['samples_per_s']:.0f} samples/s "
          f"(energy samples per second, last window), step time {last['step_time_s'] * 1e3:.1f} ms")
if evals:
    e = json.load(open(evals[-1]))
    print("- stackedmnist evaluation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in e.items()))
EOF
else
    echo "- stackedmnist: skipped, no MNIST files (bench/gpu_check.sh --fetch copies them into .gpu/mnist)" >>"$summary"
fi

for table in "$OUT"/bench_penalty_*.md; do
    [[ -f $table ]] && { echo; cat "$table"; } >>"$summary"
done
echo >>"$summary"
echo "$([[ $failed -eq 0 ]] && echo 'every phase passed' || echo 'SOME PHASES FAILED')" >>"$summary"
cat "$summary"
exit $failed
