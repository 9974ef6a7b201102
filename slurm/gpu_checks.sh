#!/bin/bash
# GPU checks of hpcllm on one GPU node (benchmarks/15-gpu-h200.md was measured with it):
#   1. the CUDA tests (tests/test_comm_mpi.py -k cuda: CUDA-aware and staged collectives, DataParallel)
#   2. a 350M gpt2 (24 x 1024, 16 heads, vocab 50304, 8 x 1024 tokens a step, bf16) on one GPU:
#      ms/step and MFU, beside nanoGPT's train.py on the same model and tokens if NANOGPT is set,
#      and the same shape as llama
#   3. all-gather / reduce-scatter of CUDA tensors against raw MPI on host memory (2 ranks)
#   4. every small layout (1 rank, dp 2, tp 2, pp 2, dp 2 + zero 1, dp 2 x tp 2 + zero 1) on the
#      GPU, fp32, 10 steps: the losses must agree; then a resume from step 10
#   5. dp 2 with parallel.overlap on / off / on + comm thread: ms/step and losses
#
#   srun -N1 -n1 --gpus=1 bash slurm/gpu_checks.sh       # or plain bash on a GPU machine
#   NANOGPT=/path/to/nanoGPT OUT=results bash slurm/gpu_checks.sh
#
# Ranks of steps 3-5 share the node's first GPU when it has one. The log goes to $OUT/log.txt.
# DEV=cpu DT=float32 SMALL=1 runs the same steps on a CPU with a tiny model (to try the script).
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
DEV=${DEV:-cuda} DT=${DT:-bfloat16} SMALL=${SMALL:-0} NANOGPT=${NANOGPT:-}
PY=${PYTHON:-python3}
DATA=$OUT/data
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe # more ranks than GPUs or cores
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
t0=$(date +%s)
stamp() { echo; echo "=== $(($(date +%s) - t0)) s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
$PY -c "from mpi4py import MPI; from hpcllm.distributed.comm import detect_cuda_aware as d; print(MPI.Get_library_version().splitlines()[0], '| CUDA-aware:', d('auto'))"

metrics() { # a run folder's median ms/step, comm share, tokens/s, MFU (steps > 5) and losses
  $PY - "$1" <<'EOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in records if "loss" in r and r.get("step", 0) > 5]
def median(key):
    values = [r[key] for r in steps if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")
print(f"{sys.argv[1]}: {len(steps)} steps, {median('ms_per_step'):.1f} ms/step, comm "
      f"{median('comm_wait_frac'):.3f}, {median('tokens_per_s'):.0f} tok/s, MFU {median('mfu'):.3f}, "
      f"losses {[round(r['loss'], 6) for r in steps[:3]]} ... {steps[-1]['loss']:.6f}")
EOF
}

median_ms() { # nanoGPT's median "time X ms" over iterations 6 and later of a log
  grep -oP "^iter ([6-9]|[1-9][0-9]+):.*time \K[0-9.]+" "$1" | sort -n |
    awk '{a[NR] = $1} END {print "nanoGPT median ms/step", a[int((NR + 1) / 2)], "over", NR, "steps"}'
}

stamp "data: byte shards of a few stdlib packages (vocab 257; the models below use 50304)"
if [ ! -f "$DATA/.done" ]; then
  LIB=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  $PY -m hpcllm.data.prepare --input "$LIB"/{email,json,asyncio,unittest,xml} --out "$DATA" \
    --tokenizer byte --overwrite && touch "$DATA/.done"
fi

stamp "CUDA tests"
timeout 300 $PY -m pytest -p no:cacheprovider tests/test_comm_mpi.py -k cuda -ra >"$OUT/pytest.txt" 2>&1
tail -4 "$OUT/pytest.txt"

if [ "$SMALL" = 1 ]; then
  BIG="--model.n_layer 2 --model.n_head 4 --model.d_model 128 --train.seq_len 128 --train.micro_batch_size 4"
  NANO="--n_layer=2 --n_head=4 --n_embd=128 --block_size=128 --batch_size=4"
  MID="--model.n_layer 2 --model.n_head 4 --model.d_model 128 --train.seq_len 64 --train.micro_batch_size 4"
else
  BIG="--model.n_layer 24 --model.n_head 16 --model.d_model 1024 --train.seq_len 1024 --train.micro_batch_size 8"
  NANO="--n_layer=24 --n_head=16 --n_embd=1024 --block_size=1024 --batch_size=8"
  MID="--model.n_layer 12 --model.n_head 12 --model.d_model 768 --train.seq_len 512 --train.micro_batch_size 4"
fi
COMMON="--data.path $DATA --train.device $DEV --train.log_every 1 --train.eval_every 100000
  --train.eval_batches 1 --run.sample_tokens 0 --checkpoint.resume false --optim.name adamw"

stamp "350M, one GPU, $DT: hpcllm gpt2, nanoGPT (torch.compile off), hpcllm llama"
for arch in gpt2 llama; do
  timeout 300 $PY -m hpcllm.train $BIG $COMMON --model.arch $arch --model.vocab_size 50304 \
    --model.dropout 0 --train.dtype "$DT" --train.max_steps 30 --run.dir "$OUT/r350$arch" >"$OUT/r350$arch.log" 2>&1 ||
    tail -5 "$OUT/r350$arch.log"
  metrics "$OUT/r350$arch"
  if [ "$arch" = gpt2 ] && [ -n "$NANOGPT" ]; then
    # nanoGPT reads data/<dataset>/{train,val}.bin (uint16 tokens) from its working folder
    NG=$OUT/nanogpt
    mkdir -p "$NG/data/bytes"
    cp "$NANOGPT"/{train.py,model.py,configurator.py} "$NG/"
    $PY -c "
import glob, sys, h5py, numpy as np
for split in ('train', 'val'):
    files = sorted(glob.glob(f'$DATA/{split}-*.h5'))
    np.concatenate([h5py.File(f)['tokens'][:] for f in files]).astype(np.uint16).tofile(f'$NG/data/bytes/{split}.bin')"
    (cd "$NG" && timeout 300 $PY train.py --dataset=bytes $NANO --gradient_accumulation_steps=1 \
      --max_iters=30 --eval_interval=100000 --eval_iters=1 --log_interval=1 --compile=False \
      --dtype="$DT" --dropout=0.0 --device="$DEV" --out_dir=out >log.txt 2>&1)
    median_ms "$NG/log.txt"
  fi
done

stamp "collectives: hpcllm on $DEV tensors vs raw MPI on host memory, 2 ranks"
timeout 300 mpirun -np 2 $PY -m hpcllm.bench collectives --device "$DEV" --mb 1 8 64 --iters 10 2>&1 | tail -16

stamp "layouts on the $DEV, fp32, 10 steps: the losses must agree"
TINY="--model.arch gpt2 --model.n_layer 4 --model.n_head 4 --model.d_model 64 --model.dropout 0
  --train.seq_len 64 --optim.warmup_steps 2 --train.max_steps 10"
while read -r np name args; do
  # stdin from /dev/null: mpirun would read the rest of the layout list
  timeout 300 mpirun -np "$np" $PY -m hpcllm.train $COMMON $TINY $args --run.dir "$OUT/$name" \
    </dev/null >"$OUT/$name.log" 2>&1 || tail -5 "$OUT/$name.log"
  metrics "$OUT/$name"
done <<'EOF'
1 one --train.micro_batch_size 4
2 dp2 --parallel.dp 2 --train.micro_batch_size 2
2 tp2 --parallel.tp 2 --train.micro_batch_size 4
2 pp2 --parallel.pp 2 --train.micro_batch_size 2 --train.grad_accum_steps 2
2 dp2-zero1 --parallel.dp 2 --parallel.zero 1 --train.micro_batch_size 2
4 dp2-tp2-zero1 --parallel.dp 2 --parallel.tp 2 --parallel.zero 1 --train.micro_batch_size 2
EOF
echo "resume the 1-rank run from its step-10 checkpoint to step 12:"
timeout 300 $PY -m hpcllm.train $COMMON $TINY --train.micro_batch_size 4 --checkpoint.resume true \
  --train.max_steps 12 --run.dir "$OUT/one" 2>&1 | grep -E "resumed|^step 1[12]/"

stamp "dp 2, $DT: overlap on / off / comm thread"
for mode in on off thread; do
  flags="--parallel.overlap $mode"
  [ $mode = thread ] && flags="--parallel.overlap on --parallel.comm_thread true"
  timeout 300 mpirun -np 2 $PY -m hpcllm.train $COMMON $MID --model.arch gpt2 --model.vocab_size 50304 \
    --model.dropout 0 --train.dtype "$DT" --train.max_steps 25 --parallel.dp 2 $flags \
    --run.dir "$OUT/dp2-$mode" >"$OUT/dp2-$mode.log" 2>&1 || tail -5 "$OUT/dp2-$mode.log"
  metrics "$OUT/dp2-$mode"
done
stamp done
