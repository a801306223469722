#!/usr/bin/env bash
# One command on a GPU machine (no network): set up, check kernels, benchmark, report.
#
#   bash bench/run_gpu.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./gpu_out
#
# Needs python3 with torch, triton, pytest, pytest-benchmark; liger-kernel comes from the
# carried wheels in .whl/ (pure Python). Everything lands in OUTDIR (11 files):
#   run_gpu.log     set-up, nvidia-smi, versions, stage timings, summary
#   gpu_check.log   gpu_check.json   kernel correctness at real shapes (bench/gpu_check.py):
#                                    linear_logps, linear_sequence_logps (seq epilogue),
#                                    Wasserstein penalty op + fused loss, vs float64 truth
#   profile.log     profile.json     device time of one linear_logps fwd+bwd at the reference
#                                    shape by category: Triton fwd, Triton bwd, gemm, other
#                                    (bench/gpu_profile.py, torch.profiler)
#   bench.log       bench.json       pytest-benchmark output of every bench stage, merged:
#                                    linear_logps (per shape group), rebel loss, train step at
#                                    equal micro-batch and at the largest micro-batch each loss
#                                    path fits under one memory cap, Wasserstein penalty
#   gpu_report.md                    markdown tables and ratios (bench/report.py)
#   train_check.log train_check.json `drorebel train`: 20 offline chi2 steps, checkpoint, resume
#                                    (bench/gpu_train_check.py; bf16 on CUDA)
#   gpu_tests.log   the Triton kernel unit tests on the GPU (optional: last, only with the
#                   budget left; gpu_check already covers every kernel at real shapes)
# Every stage runs under `timeout`, the sum stays under RUN_GPU_BUDGET_S (default 450 s); the
# stage limits below add up to that budget with the set-up's ~30 s (a stage that ends early
# leaves its time to the later ones).
# A bench stage also gets DROREBEL_BENCH_DEADLINE (bench/conftest.py): benchmarks that would
# start in the last 40 % of its time are skipped, so pytest ends by itself and writes its JSON.
# Order: the results that matter most first (reference shape, rebel loss, train step).
# Without CUDA it does a small CPU dry run of the same stages (tiny shapes, impl="torch").
# Exit status: 0 when every stage succeeded and every correctness case passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUTDIR=${1:-${OUT:-$ROOT/gpu_out}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${RUN_GPU_BUDGET_S:-450}
SITE=${RUN_GPU_SITE:-/tmp/drorebel_site}
SHIM=/tmp/drorebel_shim
PARTS=$(mktemp -d)
START=$SECONDS
MAIN_LOG=$OUTDIR/run_gpu.log
FAILED=()
: >"$MAIN_LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# do not let the repository root (cwd) shadow the installed package (Python >= 3.11)
export PYTHONSAFEPATH=1

log() { echo "[run_gpu +$((SECONDS - START))s] $*" | tee -a "$MAIN_LOG"; }

# run_stage NAME LIMIT_S LOGFILE CMD...: CMD under timeout (capped by the budget left)
run_stage() {
    local name=$1 limit=$2 logfile=$3 left rc
    shift 3
    left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        log "SKIP $name: time budget spent"
        FAILED+=("$name(no time)")
        return 1
    fi
    log "START $name (timeout ${limit}s)"
    DROREBEL_BENCH_DEADLINE=$(($(date +%s) + limit - limit * 2 / 5)) \
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile"
    rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && log "TIMEOUT $name"
    log "END $name rc=$rc"
    ((rc == 0)) || FAILED+=("$name(rc=$rc)")
    return "$rc"
}

# --- 1. set-up: carried wheels, the project, the drorebel.kernels shim ------------------
install_wheels() {
    mkdir -p "$SITE"
    if compgen -G ".whl/*.whl" >/dev/null; then
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl 2>&1 | tee -a "$MAIN_LOG"
    else
        log "no carried wheels in .whl/ (liger benchmarks will be skipped)"
    fi
    # a regular, dependency-free install of drorebel (maps kernels/ to drorebel.kernels),
    # built from a copy so that build/ and *.egg-info do not land in the tree
    local src
    src="$PARTS/src"
    mkdir -p "$src"
    cp -r drorebel kernels pyproject.toml "$src"/
    for f in setup.py setup.cfg MANIFEST.in README.md LICENSE; do [ -e "$f" ] && cp "$f" "$src"/; done
    if timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index \
        --no-cache-dir --upgrade --target "$SITE" "$src" >>"$MAIN_LOG" 2>&1; then
        log "drorebel installed into $SITE"
    else
        log "pip install of drorebel failed (see above): using the source tree via the shim"
    fi
}

# sitecustomize finder: resolves `drorebel` and `drorebel.kernels` to the source tree when
# nothing on sys.path provides them (what setuptools' editable finder does), without putting
# the repository root on sys.path, where kernels/ would shadow Hugging Face's `kernels`.
write_shim() {
    mkdir -p "$SHIM"
    cat >"$SHIM/sitecustomize.py" <<EOF
import importlib.util, sys
_MAP = {"drorebel": "$ROOT/drorebel", "drorebel.kernels": "$ROOT/kernels"}
class _DrorebelTreeFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        # appended to sys.meta_path: only asked when the path-based finders found nothing
        if fullname not in _MAP:
            return None
        return importlib.util.spec_from_file_location(
            fullname, _MAP[fullname] + "/__init__.py", submodule_search_locations=[_MAP[fullname]])
sys.meta_path.append(_DrorebelTreeFinder)
EOF
}

setup() {
    install_wheels
    write_shim
    export PYTHONPATH="$SITE:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    log "PYTHONPATH=$PYTHONPATH"
}

print_env() {
    (command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi) 2>&1 | tee -a "$MAIN_LOG"
    timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$MAIN_LOG"
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}")
from importlib.metadata import version
for name, dist in [("triton", "triton"), ("pytest", "pytest"), ("liger_kernel", "liger-kernel"),
                   ("pytest_benchmark", "pytest-benchmark"), ("transformers", "transformers")]:
    try:
        mod = importlib.import_module(name)
        print(name, version(dist), getattr(mod, "__file__", ""))
    except Exception as exc:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import drorebel, drorebel.kernels
print("drorebel", drorebel.__file__, "| kernels", drorebel.kernels.__file__)
import drorebel.ops.linear_logps, drorebel.reference.logps  # noqa: E401
print("linear_logps importable")
EOF
    return "${PIPESTATUS[0]}"
}

setup
print_env || FAILED+=("environment")
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# --- 2. kernel correctness ----------------------------------------------------------------
CHECK_ENV=()
if [ "$HAS_CUDA" = 1 ]; then
    CHECK_ARGS=()
    # linear_logps groups "N,H,V,dtype:limit_s": the reference shape first (7 providers with
    # the softmax-cache ones, 5 rounds each; torch.compile's compile is most of the time)
    BENCH_FIRST="16384,4096,128256,bf16:80"
    BENCH_ENV=(DROREBEL_BENCH_ROUNDS=5,1)
    CHECK_LIMIT=70
    TRAIN_CHECK_LIMIT=45
    PROFILE_LIMIT=20
    # the N=4096 linear group was measured on 2026-11-27; its slot now goes to the Wasserstein
    # penalty (fused Triton vs chunked vs materialised double backward vs plain log-probs)
    BENCH_LAST=""
    W_ENV=(DROREBEL_BENCH_SHAPES=4096,4096,32000,bf16 DROREBEL_BENCH_ROUNDS=5,1)
    W_LIMIT=30
    # rebel loss: the reference shape only (B=8 pairs x T=1024, H=4096, V=128256), 5 rounds
    REBEL_ENV=(DROREBEL_BENCH_ROUNDS=5,1 "PYTEST_ADDOPTS=-k B8-T1024")
    REBEL_LIMIT=35
    # train step (Llama-3.2-1B geometry, bench/test_bench_train_step.py), one process per V;
    # "shapes:limit_s", shapes as DROREBEL_BENCH_TRAIN_SHAPES ("pairs,T,V,dtype;...")
    # (V=32000 was dropped for time: the Llama-3 vocabulary is where the head matters)
    TRAIN_GROUPS=("2,2048,128256,bf16;8,512,128256,bf16:50")
    TRAIN_ENV=(DROREBEL_BENCH_ROUNDS=3,1)
    # the largest micro-batch each path fits under 48 GiB (bench/test_bench_max_batch.py):
    # same model, T=2048, V=128256, gradient checkpointing on; 2 timed rounds at B*; at most
    # 16 pairs (a fused step at 16 x 4096 tokens takes seconds; 16 is already > 2x what the
    # materialised logits are expected to fit, ~5)
    MAXB_ENV=(DROREBEL_BENCH_MAX_BATCH=2048,128256,bf16,48,16 DROREBEL_BENCH_ROUNDS=2,1)
    MAXB_LIMIT=70
else
    log "no CUDA: CPU dry run (small shapes; Triton in the interpreter; CUDA-only providers skip)"
    CHECK_ARGS=(--small --impls triton,torch,triton+cache,torch+cache)
    CHECK_ENV=(TRITON_INTERPRET=1)
    BENCH_FIRST="512,64,1000,fp32:120"
    BENCH_ENV=()
    CHECK_LIMIT=130
    TRAIN_CHECK_LIMIT=90
    PROFILE_LIMIT=40
    BENCH_LAST=""
    W_ENV=(DROREBEL_BENCH_SHAPES=256,64,1000,fp32 DROREBEL_BENCH_ROUNDS=1,0)
    W_LIMIT=60
    REBEL_ENV=(DROREBEL_BENCH_ROUNDS=1,0)
    REBEL_LIMIT=120
    TRAIN_GROUPS=("2,64,1000,fp32;4,32,1000,fp32:120")
    TRAIN_ENV=(DROREBEL_BENCH_TRAIN_MODEL=64,1,128,4,2 DROREBEL_BENCH_ROUNDS=1,0)
    MAXB_ENV=(DROREBEL_BENCH_TRAIN_MODEL=64,1,128,4,2 DROREBEL_BENCH_MAX_BATCH=64,1000,fp32,0.02,4
              DROREBEL_BENCH_ROUNDS=1,0)
    MAXB_LIMIT=90
fi
run_stage gpu_check "$CHECK_LIMIT" "$OUTDIR/gpu_check.log" env "${CHECK_ENV[@]}" \
    "$PY" bench/gpu_check.py "${CHECK_ARGS[@]}" --out "$OUTDIR/gpu_check.json"
# `drorebel train` itself: 20 offline chi2 steps (bf16 on CUDA), checkpoint, stop + resume
run_stage train_check "$TRAIN_CHECK_LIMIT" "$OUTDIR/train_check.log" \
    "$PY" bench/gpu_train_check.py --out "$PARTS/train_check" $([ "$HAS_CUDA" = 1 ] || echo --small)
[ -f "$PARTS/train_check/train_check.json" ] && cp "$PARTS/train_check/train_check.json" "$OUTDIR/"

# --- 3. benchmarks: one pytest process per group (a timeout loses that group only) --------
# bench_stage NAME LIMIT_S PART SUITE [VAR=VALUE...]: SUITE's JSON goes to $PARTS/PART.json
bench_stage() {
    local name=$1 limit=$2 part=$3 suite=$4
    shift 4
    run_stage "$name" "$limit" "$OUTDIR/bench.log" env "$@" "$PY" -m pytest "bench/$suite" \
        -q -ra --tb=short -p no:cacheprovider --benchmark-enable --benchmark-only \
        --benchmark-columns=min,median,mean,max,rounds --benchmark-json="$PARTS/$part.json"
}
linear_stage() {  # linear_stage "N,H,V,dtype:limit_s" PART
    bench_stage "bench[${1%%:*}]" "${1##*:}" "$2" test_bench_linear_logps.py \
        "${BENCH_ENV[@]}" "DROREBEL_BENCH_SHAPES=${1%%:*}"
}
linear_stage "$BENCH_FIRST" bench_1
bench_stage rebel_loss "$REBEL_LIMIT" rebel test_bench_rebel_loss.py "${REBEL_ENV[@]}"
i=0
for group in "${TRAIN_GROUPS[@]}"; do
    i=$((i + 1))
    bench_stage "train_step[${group%%:*}]" "${group##*:}" "train_$i" test_bench_train_step.py \
        "${TRAIN_ENV[@]}" "DROREBEL_BENCH_TRAIN_SHAPES=${group%%:*}"
done
bench_stage max_batch "$MAXB_LIMIT" max_batch test_bench_max_batch.py "${MAXB_ENV[@]}"
bench_stage wasserstein "$W_LIMIT" wasserstein test_bench_wasserstein.py "${W_ENV[@]}"
# where the time of one linear_logps fwd+bwd goes (reference shape; CPU: tiny, impl torch)
run_stage profile "$PROFILE_LIMIT" "$OUTDIR/profile.log" "$PY" bench/gpu_profile.py \
    --out-dir "$OUTDIR" $([ "$HAS_CUDA" = 1 ] || echo --small)
[ -n "$BENCH_LAST" ] && linear_stage "$BENCH_LAST" bench_2

# --- 4. report --------------------------------------------------------------------------
run_stage report 10 "$MAIN_LOG" "$PY" bench/report.py "$PARTS"/*.json \
    --merge-into "$OUTDIR/bench.json" -o "$OUTDIR/gpu_report.md"
[ -f "$OUTDIR/gpu_report.md" ] && tee -a "$MAIN_LOG" <"$OUTDIR/gpu_report.md"

# --- 5. the Triton unit tests, compiled for this GPU (whatever budget is left) -------------
if [ "$HAS_CUDA" = 1 ] && ((BUDGET - (SECONDS - START) >= 30)); then
    # compiled (not interpreted) runs of every kernel's unit tests, newest kernels first
    DROREBEL_AUTOTUNE=0 run_stage gpu_tests 120 "$OUTDIR/gpu_tests.log" "$PY" -m pytest -q -ra \
        --tb=short -p no:cacheprovider tests/test_softmax_cache.py tests/test_seq_epilogue.py \
        tests/test_wasserstein_triton.py tests/test_linear_logps_triton.py tests/test_bench_memory.py
fi
[ "$HAS_CUDA" = 1 ] && ((BUDGET - (SECONDS - START) < 30)) &&
    log "SKIP gpu_tests (optional): under 30 s of the budget left"
rm -rf "$PARTS"

if ((${#FAILED[@]})); then
    log "FAILED: ${FAILED[*]}"
    exit 1
fi
log "all stages passed in $((SECONDS - START))s"
