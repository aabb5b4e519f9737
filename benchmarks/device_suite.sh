#!/usr/bin/env bash
# The GPU figures, written under $OUT (on an H200 the whole list took about 20 minutes, steps of
# 5-130 s; one call within the default 460 s budget gets the first six, --only the rest):
#   1. the attention-kernel checks (cuDNN vs XLA, odd lengths, packed rows) on the device;
#   2. `minimind-jax bench` at 64 x 512 bfloat16 for minimind2-small and minimind2 with each
#      attention path (cudnn, xla, chunked), for minimind2 on packed rows (cudnn, xla) and for
#      minimind2-moe with each MoE path (ragged, blocked, dense): tokens/s, MFU of the bf16
#      matmul peak measured in the same process, peak device memory, beside eager PyTorch
#      (transformers Llama) and, with a reference checkout, the reference's own model and step
#      (fp16 autocast, as its trainer on CUDA);
#   3. a profile of minimind2's step (benchmarks/profile_step.py: device time per kernel kind);
#   4. one whole epoch of `pretrain` (padded, --pack next fit, --pack best fit) on ~20k short
#      documents vs the reference's own train_pretrain.py (when a checkout is given);
#   5. the golden tests (reference logits, MoE aux loss, golden training curves) on the device;
#   6. suite.md (the table) and suite.json (every figure) from the pieces.
# Steps run in that order of importance. Every step has a time limit and the suite a total
# budget: a step that would not fit is recorded as skipped, never left running. Nothing is
# estimated: a missing figure stays empty.
#
#   benchmarks/device_suite.sh [--dry_run] [--reference_dir PATH] [--only REGEX]
#
# --dry_run: the same steps on CPU with a tiny model and small sizes (~1.5 minutes), to check
# the script before any device time is spent (tests/test_device_suite.py runs it).
# --only REGEX: run just the steps whose names match (egrep), e.g. to finish a suite that ran
# out of time in a second call; the report covers what is under $OUT.
# --reference_dir (or $REFERENCE_DIR): a checkout of jingyaogong/minimind at d9453ed, e.g.
#   git --git-dir=MIRROR archive d9453ed | tar -x -C shared/minimind_d9453ed
# Needs: pip install -e '.[test,torch]' (and '.[cuda]' on GPU); the reference's own
# requirements (pandas, scikit-learn) for its epoch.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
ONLY=""
REF="${REFERENCE_DIR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) DRY=1 ;;
    --reference_dir) REF="$2"; shift ;;
    --reference_dir=*) REF="${1#*=}" ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$REF" ] && [ ! -f "$REF/model/model.py" ]; then
  echo "error: --reference_dir $REF: no model/model.py (a d9453ed checkout is needed)" >&2
  exit 2
fi
OUT="${OUT:-$PWD/device_suite_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu MINIMIND_JAX_HUGEPAGES=0  # no re-exec: a quicker start
  BUDGET="${SUITE_BUDGET_S:-300}"  # ~1.5 min on an idle 2-core CPU; room for a loaded one
  MODEL=(--dim 64 --n_layers 2 --n_heads 8 --n_kv_heads 2)
  SHAPE=(--batch_size 2 --seq_len 64 --dtype float32)
  BENCH=("${SHAPE[@]}" --steps 1 --warmup 0 --peak_size 512)
  PRESETS=(tiny)
  GOLDEN=(tests/test_model.py -k "golden_logits")
  EPOCH=(--n_docs 24 --dim 64 --n_layers 2 --batch_size 8 --max_seq_len 64 --modes best_fit)
  DOC_LEN=16
  STEP_LIMIT=100
else
  BUDGET="${SUITE_BUDGET_S:-460}"
  MODEL=()
  SHAPE=(--batch_size 64 --seq_len 512 --dtype bfloat16)
  BENCH=("${SHAPE[@]}" --steps 5 --warmup 2)
  PRESETS=(minimind2-small minimind2)
  GOLDEN=(tests/test_model.py tests/test_train_golden.py)
  EPOCH=(--n_docs 20000 --dim 512 --n_layers 8 --batch_size 32 --dtype auto)
  DOC_LEN=110  # about the epoch corpus's average document
  STEP_LIMIT=150
fi
START=$SECONDS
touch "$OUT/steps.jsonl"  # appended to: a second call with --only adds its steps

# selected NAME: whether --only (if given) picks the step NAME.
selected() { [ -z "$ONLY" ] || grep -Eq "$ONLY" <<< "$1"; }

# step NAME LIMIT_S CMD...: run CMD with a time limit, log to $OUT/NAME.log, record the outcome.
step() {
  local name="$1" limit="$2"; shift 2
  selected "$name" || return
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped (suite budget ${BUDGET} s spent)"
    printf '{"step": "%s", "status": "skipped", "seconds": 0}\n' "$name" >> "$OUT/steps.jsonl"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  echo "   $status (rc $rc) in $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && tail -5 "$OUT/$name.log" | sed 's/^/   | /'
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d}\n' \
    "$name" "$status" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.jsonl"
}

step env 60 "$PY" -c "
import json, platform, jax, jaxlib
d = jax.devices()[0]
info = {'device': d.device_kind, 'platform': d.platform, 'count': jax.device_count(),
        'jax': jax.__version__, 'python': platform.python_version(), 'host': platform.node()}
print(json.dumps(info)); open('$OUT/env.json', 'w').write(json.dumps(info))"
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

ON_GPU=$("$PY" -c "import jax; print(int(jax.default_backend() == 'gpu'))" 2>/dev/null || echo 0)
step kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py

# model_flags PRESET: the model flags of a preset name (tiny and tiny-moe: the dry run's model).
model_flags() {
  case "$1" in
    tiny) echo "${MODEL[@]}" ;;
    tiny-moe) echo "${MODEL[@]}" --use_moe ;;
    *) echo --preset "$1" ;;
  esac
}
# bench NAME PRESET ATTENTION MOE FIRST [EXTRA...]: FIRST=1 also times eager PyTorch and the
# reference.
bench() {
  local name="$1" preset="$2" attention="$3" moe="$4" first="$5"; shift 5
  if [ "$attention" = cudnn ] && [ "$ON_GPU" != 1 ]; then
    if selected "bench_$name"; then
      echo "== bench_$name: skipped (cuDNN attention needs a GPU)"
      printf '{"step": "bench_%s", "status": "n/a", "seconds": 0}\n' "$name" \
        >> "$OUT/steps.jsonl"
    fi
    return
  fi
  local args=("${BENCH[@]}" $(model_flags "$preset") --attention_impl "$attention"
              --moe_impl "$moe" --json "$OUT/bench_$name.json" "$@")
  if [ "$first" = 1 ]; then
    [ -n "$REF" ] && args+=(--reference_dir "$REF")
  else
    args+=(--no_torch)
  fi
  step "bench_$name" "$STEP_LIMIT" "$PY" -m minimind_jax.cli bench "${args[@]}"
}
# The default kernel on each platform first, with the baselines beside it.
FIRST_ATTENTION=cudnn
[ "$ON_GPU" = 1 ] || FIRST_ATTENTION=xla
for preset in "${PRESETS[@]}"; do
  bench "${preset}_$FIRST_ATTENTION" "$preset" "$FIRST_ATTENTION" auto 1
done
big="${PRESETS[-1]}"
step profile "$STEP_LIMIT" "$PY" benchmarks/profile_step.py "${SHAPE[@]}" $(model_flags "$big") \
  --name "$big" --out "$OUT"
for attention in cudnn xla; do
  bench "${big}_packed_$attention" "$big" "$attention" auto 0 --doc_len "$DOC_LEN"
done

epoch_args=("${EPOCH[@]}" --json "$OUT/epoch.json")
[ -n "$REF" ] && epoch_args+=(--reference_dir "$REF")
step epoch $((STEP_LIMIT * 2)) "$PY" benchmarks/epoch_bench.py "${epoch_args[@]}"

for preset in "${PRESETS[@]}"; do
  for attention in cudnn xla chunked; do
    [ "$attention" = "$FIRST_ATTENTION" ] && continue
    bench "${preset}_$attention" "$preset" "$attention" auto 0
  done
done
moe_preset=minimind2-moe
[ "$DRY" = 1 ] && moe_preset=tiny-moe
first=1
for moe in ragged blocked dense; do
  bench "${moe_preset}_$moe" "$moe_preset" auto "$moe" "$first"
  first=0
done

step golden "$STEP_LIMIT" "$PY" -m pytest -q -p no:cacheprovider "${GOLDEN[@]}" \
  --junitxml="$OUT/golden.xml"

"$PY" benchmarks/device_suite_report.py "$OUT" --total_s $((SECONDS - START))
