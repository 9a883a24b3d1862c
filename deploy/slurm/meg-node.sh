#!/usr/bin/env bash
# One Slurm task per node: starts this node's share of the training processes with
# `accelerate launch`. Run by deploy/slurm/meg.sbatch through srun; every value that differs
# between nodes (machine rank, CPU count) is read HERE, on the node, not in the batch script.
#
# Inputs (exported by meg.sbatch): MEG_MAIN_ADDR, MEG_MAIN_PORT, MEG_NUM_MACHINES, and optionally
# MEG_PROCS_PER_NODE (default: the GPUs Slurm granted this job on the node, else 1),
# MEG_PROMETHEUS_TARGETS and MEG_PROMETHEUS_ADDR (monitoring, unless the arguments set them).
# Arguments: trainer/main.py's.
# Exit code: the launcher's, except 75 (PREEMPTED_EXIT_CODE) when the warning signal (USR1)
# arrived and training stopped early: accelerate launch reports any failing worker as 1, so the
# trainer's own 75 does not survive it.
set -uo pipefail

machine_rank=${SLURM_PROCID:?run me through srun}   # one task per node: task id == node rank
num_machines=${MEG_NUM_MACHINES:-${SLURM_NTASKS:-1}}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
granted=${SLURM_GPUS_ON_NODE:-0}
if (( granted > 0 && gpus == 0 )); then
    echo "meg-node.sh: Slurm gave this job $granted GPU(s) on $(hostname), but nvidia-smi lists none here;" \
        "stopping instead of training on the CPU. Check the node's NVIDIA driver, or submit with" \
        "--gres=none for a CPU-only run." >&2
    exit 2
fi
# nvidia-smi lists every GPU of the node, also those Slurm gave other jobs where the cluster does not
# confine devices (no cgroup ConstrainDevices): one process per GPU this job was granted.
if (( granted > 0 )); then
    gpus=$(( granted < gpus ? granted : gpus ))
elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    case $CUDA_VISIBLE_DEVICES in
        ""|NoDevFiles) gpus=0 ;;  # Slurm's value for a job without GPUs: CUDA sees none
        *)
            IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
            gpus=$(( ${#visible[@]} < gpus ? ${#visible[@]} : gpus ))
            ;;
    esac
fi
procs=${MEG_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
if [[ ! $procs =~ ^[1-9][0-9]{0,3}$ ]]; then  # bash would evaluate anything else as an expression
    echo "meg-node.sh: MEG_PROCS_PER_NODE wants a whole number from 1 to 9999 (got '$procs')" >&2
    exit 2
fi
if [[ $gpus -eq 0 ]]; then
    # Without a GPU, accelerate forms one group only when told to use the CPU (ACCELERATE_USE_CPU=1):
    # otherwise the processes never meet.
    export ACCELERATE_USE_CPU=1
fi
# Threads per process: this task's CPUs shared among its processes (unset, 2 processes on 2 cores
# ran 3x slower). SLURM_CPUS_PER_TASK is set only with --cpus-per-task; else split the node's CPUs
# among the tasks on it.
tasks_here=${SLURM_STEP_TASKS_PER_NODE:-1}
tasks_here=${tasks_here%%[(,]*}
cpus=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-$(nproc)} / (tasks_here > 0 ? tasks_here : 1) ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / procs > 0 ? cpus / procs : 1 ))}

# Monitoring: each rank's endpoint on an address Prometheus can reach, registered in the shared
# target folder (file_sd). The user's own log.prometheus_* arguments win.
monitoring=()
if [[ -n ${MEG_PROMETHEUS_TARGETS:-} && " $* " != *" log.prometheus_targets="* ]]; then
    monitoring+=("log.prometheus_targets=$MEG_PROMETHEUS_TARGETS")
fi
if [[ -n ${MEG_PROMETHEUS_ADDR:-} && " $* " != *" log.prometheus_addr="* ]]; then
    monitoring+=("log.prometheus_addr=$MEG_PROMETHEUS_ADDR")
fi

preempted=0
trap 'preempted=1' USR1
# The launcher (torch's elastic agent) would die of USR1's default action and take the workers
# with it before they checkpoint: it ignores USR1; the workers install their own handler.
(
    trap '' USR1
    # trainer.launch is accelerate launch with the rendezvous store on the head node's address only.
    exec python -m trainer.launch --config_file "${MEG_ACCELERATE_CONFIG:-deploy/accelerate/multinode.yaml}" \
        --multi_gpu --num_machines "$num_machines" --machine_rank "$machine_rank" \
        --num_processes $(( num_machines * procs )) \
        --main_process_ip "$MEG_MAIN_ADDR" --main_process_port "$MEG_MAIN_PORT" \
        trainer/main.py "$@" "${monitoring[@]}"
) &
pid=$!
echo "node $(hostname -s) machine_rank=$machine_rank/$num_machines: $procs process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS, main $MEG_MAIN_ADDR:$MEG_MAIN_PORT" >&2

while :; do
    wait "$pid"; rc=$?
    # > 128 is also what `wait` returns when a trapped signal interrupts it: wait again.
    (( rc > 128 )) && kill -0 "$pid" 2>/dev/null && continue
    break
done
if [[ $rc -ne 0 && $preempted -eq 1 ]]; then
    exit 75
fi
exit "$rc"
