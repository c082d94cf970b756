#!/usr/bin/env bash
# Issue 19 device check: jaxspec on an H200 beside transformers, in one run of about 7 minutes.
#
#   run(command="bash scripts/device_check.sh", carry=[".devcheck"], timeout_s=540)
#   SMOKE=1 bash scripts/device_check.sh     # here, on the CPU: tiny shapes, a few minutes
#
# Before the first run, once, on the CPU machine (writes the ignored .devcheck/, 3.5 MB):
#   echo /.devcheck/ >> .git/info/exclude; python scripts/device_bench.py prep
#
# Steps (each under `timeout`, output tee'd to $OUT/log.txt; results land in $OUT as they come):
#   env          versions, devices, nvidia-smi                           -> summary.md, env.txt
#   roofline     jaxspec bench --roofline --shape llama3-8b --context 2048
#                --verify-tokens 2,4,8,16,32,64                          -> roofline.md
#   llama        scripts/device_bench.py llama: plain vs transformers (static cache +
#                torch.compile, and eager), Oracle k=2/4/8, chain/tree verify cost, profile
#   smol         scripts/device_bench.py smol: SmolLM2-135M shape, random HF checkpoint,
#                jaxspec plain/oracle/ngram/early-exit beside transformers
#   llama_batch  scripts/device_bench.py llama --sections batch,batch_extra
# STEPS=llama_batch,smol bash scripts/device_check.sh reruns a subset (results are appended).
# BUDGET_S (default 420): no step starts a section past it; each step's timeout keeps room for
# the steps after it.
#
# Files back in $OUT (at most 8): summary.md (every table, markdown), results.json (every
# number), roofline.md (the CLI's doc-ready section), log.txt (all output), env.txt
# (nvidia-smi, pip), artifacts.tar.gz (profile trace summary, optimized HLO), steps.txt.

set -u -o pipefail
export PYTHONUNBUFFERED=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
SMOKE=${SMOKE:-0}
if [ -z "${OUT:-}" ]; then OUT=$REPO/out/device_check; fi
export OUT
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then BUDGET_S=${BUDGET_S:-1200}; else BUDGET_S=${BUDGET_S:-420}; fi
STEPS=${STEPS:-env,roofline,llama,smol,llama_batch}
T0=$(date +%s)
LOG=$OUT/log.txt
if [ -z "${PY:-}" ]; then
  if [ "$SMOKE" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi

# ---------------------------------------------------------------- environment (no installs from the net)
# Wheels carried in .devcheck/whl/ or .whl/ (gguf: a jaxspec dependency the image lacks; only
# GGUF loading imports it) go to /tmp/jaxspec_devcheck_site, after the image's own packages on the path.
SITE=""
WHEELS=$(ls .devcheck/whl/*.whl .whl/*.whl 2>/dev/null | tr '\n' ' ')
if [ -n "$WHEELS" ]; then
  rm -rf /tmp/jaxspec_devcheck_site
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/jaxspec_devcheck_site $WHEELS 2>&1 | tee -a "$LOG"; then SITE=/tmp/jaxspec_devcheck_site; fi
fi
# jaxspec without installing: a shim package whose members link to jaxspec/, models/ and
# sharding/ (pyproject maps models -> jaxspec.models, sharding -> jaxspec.sharding).
SHIM=/tmp/jaxspec_shim_$$
mkdir -p "$SHIM/jaxspec"
for f in "$REPO"/jaxspec/*; do ln -sfn "$f" "$SHIM/jaxspec/$(basename "$f")"; done
ln -sfn "$REPO/models" "$SHIM/jaxspec/models"
ln -sfn "$REPO/sharding" "$SHIM/jaxspec/sharding"
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}${SITE:+:$SITE}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export TOKENIZERS_PARALLELISM=false
# Compiled programs persist across the steps' processes (and a rerun on a warm machine).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxspec_jax_cache}
CC_STATE=$( [ -d "$JAX_COMPILATION_CACHE_DIR" ] && [ -n "$(ls -A "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null)" ] && echo warm || echo cold)
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  REQ=""
else
  REQ="--require-gpu"
fi

echo "# device_check $(date -u +%FT%TZ) SMOKE=$SMOKE STEPS=$STEPS BUDGET_S=$BUDGET_S jax-cache=$CC_STATE" | tee -a "$LOG" "$OUT/steps.txt"

now() { date +%s; }
left() { echo $(( T0 + BUDGET_S - $(now) )); }
want() { case ",$STEPS," in *",$1,"*) return 0;; *) return 1;; esac; }

# step NAME CAP RESERVE cmd...: timeout = min(CAP, time left - RESERVE); skipped under 20 s.
step() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local t=$(( $(left) - reserve ))
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    echo "step $name: SKIPPED (only $(left) s of the budget left, $reserve s kept for later steps)" | tee -a "$LOG" "$OUT/steps.txt"
    return 0
  fi
  export STEP_DEADLINE=$(( $(now) + t - 8 ))
  echo "=== step $name: timeout ${t}s, $(left) s of the budget left, t+$(( $(now) - T0 ))s" | tee -a "$LOG"
  local s0; s0=$(now)
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local msg="step $name: rc=$rc in $(( $(now) - s0 )) s (timeout ${t}s)"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && msg="$msg TIMED OUT"
  echo "$msg" | tee -a "$LOG" "$OUT/steps.txt"
  return 0
}

B="$PY scripts/device_bench.py"

# The remaining steps' minimum useful time, kept back from each earlier step.
R_LLAMA=$(want llama && echo 110 || echo 0)
R_SMOL=$(want smol && echo 70 || echo 0)
if [ "$SMOKE" = 1 ]; then R_LLAMA=0; R_SMOL=0; fi

if want env; then
  {
    echo "## nvidia-smi"; (nvidia-smi 2>&1 || echo "no nvidia-smi")
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv 2>&1
    echo "## python"; $PY -c "import sys; print(sys.version, sys.executable)"
    echo "## pip"; $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy|torch|triton|transformers|tokenizers|sentencepiece|safetensors|gguf|tqdm|jinja2|ml.dtypes|nvidia-cu)" 
    echo "## nproc $(nproc)"; free -g 2>/dev/null | head -2
  } > "$OUT/env.txt" 2>&1
  step env 60 0 $B env --out "$OUT" $REQ
  if [ "$SMOKE" != 1 ] && ! grep -q '"jax_platform": "gpu"' "$OUT/results.json" 2>/dev/null; then
    echo "JAX has no GPU here: stopping (see env.txt / log.txt)" | tee -a "$LOG" "$OUT/steps.txt"
    exit 3
  fi
fi

if want roofline; then
  if [ "$SMOKE" = 1 ]; then
    RARGS=(--shape tiny --context 128 --verify-tokens 2,4,8,16 --copy-mib 16)
  else
    RARGS=(--shape llama3-8b --context 2048 --verify-tokens 2,4,8,16,32,64)
  fi
  # Alone on the GPU: JAX may take its default 75% of the memory.
  step roofline 200 $(( R_LLAMA + R_SMOL )) \
    $PY -m jaxspec.cli bench --roofline "${RARGS[@]}" --out "$OUT/roofline.md"
fi

if want llama; then
  # jaxspec and torch share the GPU in this process: JAX takes 45% (62 GiB) of it.
  step llama 230 "$R_SMOL" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
    bash -c "$B llama --out '$OUT' --deadline \$STEP_DEADLINE --sections plain,oracle,tree,profile,hf"
fi

if want smol; then
  step smol 150 0 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 \
    bash -c "$B smol --out '$OUT' --deadline \$STEP_DEADLINE"
fi

if want llama_batch; then
  step llama_batch 240 0 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 \
    bash -c "$B llama --out '$OUT' --deadline \$STEP_DEADLINE --sections batch,batch_extra"
fi

nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv >> "$OUT/env.txt" 2>&1 || true
rm -rf "$SHIM"
echo "# done in $(( $(now) - T0 )) s" | tee -a "$LOG" "$OUT/steps.txt"
echo; echo "================ steps"; cat "$OUT/steps.txt"
echo "================ digest (full tables: summary.md, numbers: results.json)"
$PY scripts/device_bench.py digest --out "$OUT" 2>&1 | tee -a "$LOG"
exit 0
