# hpcllm's launch logic for Slurm: sourced by the slurm/*.sbatch scripts, not submitted itself.
#
#     source slurm/launch.sh
#     hpcllm_launch [--section.key value ...]    # returns the launcher's exit status
#
# It chooses the run folder, starts `python -m hpcllm.train` on every task of the allocation
# with srun (or mpirun), forwards the batch shell's signals to the ranks, and requeues the job
# when the ranks saved and stopped early on the time warning, so that the requeued job (same
# job id, same run folder) resumes where this one stopped.
#
# Settings, all optional (environment variables; `sbatch --export=ALL,NAME=value` sets them):
#   HPCLLM_LAUNCHER     srun (default: `srun --mpi=pmix`) or mpirun (Open MPI's, which reads
#                       the Slurm allocation itself)
#   HPCLLM_RUN_DIR      run folder; default runs/<job name>-<job id>. A --run.dir argument wins.
#                       Set it to continue an earlier job's run in a new submission.
#   HPCLLM_REQUEUE      1 (default): requeue a run that stopped on SIGUSR1 or run.time_limit_s;
#                       0: never (resubmit by hand with HPCLLM_RUN_DIR)
#   HPCLLM_SRUN_ARGS    extra srun options, e.g. "--cpu-bind=cores"
#   HPCLLM_MPIRUN_ARGS  extra mpirun options, e.g. "--mca pml ucx"
#
# Signals. `#SBATCH --signal=B:USR1@300` sends SIGUSR1 to this batch shell only, 300 s before
# the time limit (so does `scancel --signal=USR1 --batch <job>`). The trap below passes it to
# srun or mpirun, which pass it to every rank; hpcllm then saves a checkpoint at the next step
# boundary, writes <run dir>/status.json {"state": "stopped"} and exits 0, and this script
# requeues the job. SIGTERM (scancel, preemption) is passed on the same way but never requeues.
# Open MPI's mpirun (prterun) forwards SIGUSR1 to the ranks but answers SIGTERM by killing them
# at once, so under mpirun the trap turns SIGTERM into SIGUSR1; a plain `scancel` still sends
# SIGTERM to mpirun directly, which then ends the ranks without saving: with mpirun, stop a job
# with `scancel --signal=USR1 --batch <job>` first.

_hpcllm_log() { echo "[hpcllm-slurm $(date '+%F %T')] $*"; }

_hpcllm_forward() {  # trap handler: pass signal $1 on to the launcher
    local sig=$1
    _hpcllm_signals+=" $1"
    [ "$_hpcllm_launcher" = mpirun ] && sig=USR1  # prterun kills its ranks on SIGTERM
    _hpcllm_log "batch shell got SIG$1: sending SIG$sig to $_hpcllm_launcher (pid $_hpcllm_pid)"
    [ -n "$_hpcllm_pid" ] && kill -s "$sig" "$_hpcllm_pid" 2>/dev/null
    return 0
}

_hpcllm_step_of() {  # the step number in a checkpoint name such as step_000100 (0 if none)
    local name=${1##*step_}
    [[ $name =~ ^[0-9]+$ ]] && echo $((10#$name)) || echo 0
}

hpcllm_launch() {
    : "${SLURM_JOB_ID:?hpcllm_launch runs inside a Slurm job (submit the script with sbatch)}"
    local run_dir=${HPCLLM_RUN_DIR:-runs/${SLURM_JOB_NAME:-hpcllm}-${SLURM_JOB_ID}}
    local arg prev=""
    for arg in "$@"; do  # a --run.dir argument wins; hpcllm takes the last one given
        [ "$prev" = --run.dir ] && run_dir=$arg
        [[ $arg == --run.dir=* ]] && run_dir=${arg#--run.dir=}
        prev=$arg
    done
    mkdir -p "$run_dir"
    # status.json is written by rank 0 when the run ends; a stale one must not cause a requeue.
    rm -f "$run_dir/status.json"
    local start_step=0
    [ -f "$run_dir/checkpoints/latest" ] && start_step=$(_hpcllm_step_of "$(cat "$run_dir/checkpoints/latest")")
    # Slurm writes the job's output where --output says (it cannot create folders); link it
    # into the run folder so that output, metrics and checkpoints are found together.
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p') || out=""
    [ -n "$out" ] && { ln -sfn "$(realpath -m "$out")" "$run_dir/slurm-$SLURM_JOB_ID.out" || true; }

    _hpcllm_launcher=${HPCLLM_LAUNCHER:-srun}
    local cmd
    case $_hpcllm_launcher in
        # --kill-on-bad-exit: a rank that dies ends the whole step instead of leaving the
        # others blocked in a collective until the watchdog fires.
        srun) cmd=(srun --mpi=pmix --kill-on-bad-exit=1 ${HPCLLM_SRUN_ARGS:-}) ;;
        # Open MPI starts one rank per Slurm task; torch's threads need the task's cores
        # unbound (mpirun would bind each rank to a single core by default).
        mpirun) cmd=(mpirun -np "${SLURM_NTASKS:?set --ntasks or --ntasks-per-node}" --bind-to none
                     ${HPCLLM_MPIRUN_ARGS:-}) ;;
        *) echo "HPCLLM_LAUNCHER must be srun or mpirun, got '$_hpcllm_launcher'" >&2; return 2 ;;
    esac
    cmd+=(python -m hpcllm.train --run.dir "$run_dir" "$@")

    _hpcllm_log "job ${SLURM_JOB_NAME:-}-$SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on" \
        "${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-?} tasks;" \
        "run dir $run_dir (latest checkpoint: step $start_step)"
    _hpcllm_log "${cmd[*]}"
    _hpcllm_signals="" _hpcllm_pid=""
    trap '_hpcllm_forward USR1' USR1
    trap '_hpcllm_forward TERM' TERM
    # In the background, so that the traps run at once: bash defers a trap while a
    # foreground command runs, but `wait` returns early when one fires.
    "${cmd[@]}" &
    _hpcllm_pid=$!
    local rc
    while :; do
        wait "$_hpcllm_pid" && rc=0 || rc=$?
        kill -0 "$_hpcllm_pid" 2>/dev/null || break  # still running: `wait` was cut short by a trap
    done
    if [ "$rc" -gt 128 ]; then  # cut short just as it exited: collect its own status
        local late
        wait "$_hpcllm_pid" && late=0 || late=$?
        [ "$late" -ne 127 ] && rc=$late
    fi
    trap - USR1 TERM

    local state="" step=0 reason=""
    if [ -f "$run_dir/status.json" ]; then
        read -r state step reason < <(python -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(s["state"], s["step"], s.get("reason") or "")' "$run_dir/status.json") || true
    fi
    _hpcllm_log "$_hpcllm_launcher exited with $rc; run state: ${state:-unknown (no status.json)} at step $step"
    if [ "$rc" -eq 0 ] && [ "$state" = stopped ]; then
        if [[ " $_hpcllm_signals " == *" TERM "* || $reason == SIGTERM || $reason == SIGINT ]]; then
            _hpcllm_log "stopped by ${reason:-SIGTERM} (scancel, preemption or Ctrl-C): not requeued. To go on:" \
                "HPCLLM_RUN_DIR=$run_dir sbatch <script>"
        elif [ "${HPCLLM_REQUEUE:-1}" != 1 ]; then
            _hpcllm_log "stopped early ($reason); HPCLLM_REQUEUE=${HPCLLM_REQUEUE} so not requeued." \
                "To go on: HPCLLM_RUN_DIR=$run_dir sbatch <script>"
        elif [ "$step" -le "$start_step" ]; then
            _hpcllm_log "stopped early ($reason) without completing a step in this job: not requeued" \
                "(it would loop); give the job more time or a later --signal"
        else
            _hpcllm_log "stopped early ($reason) at step $step: requeueing job $SLURM_JOB_ID; it resumes in $run_dir"
            scontrol requeue "$SLURM_JOB_ID" || _hpcllm_log "scontrol requeue failed (was the job" \
                "submitted with --requeue?); to go on: HPCLLM_RUN_DIR=$run_dir sbatch <script>"
        fi
    fi
    return "$rc"
}
