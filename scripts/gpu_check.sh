#!/usr/bin/env bash
# The GPU check: one run on an H200 (or H100) machine that builds the cuda backend, checks every
# backend against float64 on both adjugate layouts, runs compute-sanitizer over the cuda
# backend, and times the Grove layer (folded and sections) beside the plain layer and vLLM's
# kernel. A GPU machine has no network: everything it needs travels with the checkout.
#
#   bash scripts/gpu_check.sh [--dry-run] [--stages a,b,...] [OUT_DIR]
#
# OUT_DIR defaults to $OUT, else ./gpu_check_out.
# --dry-run prints the stages, their time limits and commands, and runs nothing (no GPU needed).
#
# What the GPU machine needs beside the checkout, prepared on a CPU machine from the repository
# root (all three paths are git-ignored: copy them along with the tree):
#   python3 csrc/build_cuda.py            # the CUDA objects -> build/grove_cuda: the GPU
#                                         # machine's nvcc finds them in its cache (same nvcc)
#   python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl   # CUTLASS headers
#   mkdir -p .anchors && cp -r <the vLLM anchor directory> .anchors/vllm   # optional: vLLM's
#                                         # fused_experts beside ours (its shim/ goes on PYTHONPATH)
# then run `bash scripts/gpu_check.sh` there, with build/grove_cuda, .whl and .anchors present.
#
# Stages (each under its own `timeout`, so one that hangs or fails never takes another's time;
# the whole run stays under GPU_CHECK_BUDGET_S, default 480 s, and a stage that no longer fits
# is skipped and says so):
#   build     CUTLASS wheel into a private site dir, the extension in place from the prepared
#             objects (the binding only, ~30-60 s), build_info
#   selfcheck python -m grove_kernels.selfcheck (every backend vs float64, grove-33b, fwd + every
#             gradient), once per layout (GROVE_ADJUGATE_LAYOUT=sections, folded)
#   tests     the gpu-marked tests of torch and triton (both layouts: the tests' layout fixture);
#             GPU_CHECK_TESTS (pytest arguments) runs a selection instead
#   cuda      the gpu-marked tests of the cuda backend (its ops, folded ops, the API), in their
#             own process: a CUDA error poisons the context
#   sanitize  compute-sanitizer memcheck over one forward + backward of the cuda backend per
#             layout, and one inference forward on the fused GEMM-1 (a small odd-sized layer)
#   bench     python -m bench --pass both --layout folded,sections: grove and plain on triton and
#             cuda, vLLM's plain kernel when present; grove-33b bf16 uniform, T = 16384 ... 1
#             (largest first: a cut run keeps the rows that matter most); takes the time left
#   settings  the bench again under each other setting of SETTINGS below (an environment
#             variable that selects another kernel path), the rows of the paths it changes only:
#             OUT_DIR/bench_uniform@<name>.json; the summary lists them as <backend>@<name>
#   kernels   python -m bench.kernels: the profiler's µs per kernel of one forward at T = 16384
#             and 1024 (grove, plain, vLLM), where the time of a call goes; if time is left
#   coactive  the same at coactive routing, T = 16384, 4096, if time is left
#   summary   the table (printed last): folded vs sections per backend, vs vLLM plain, and
#             fwd+bwd / fwd (scripts/gpu_summary.py over the bench JSON files)
# Every stage writes OUT_DIR/<stage>.log; the bench JSON files and OUT_DIR/stages.txt (stage,
# exit status, seconds) are the record. Tests run verbose: a stage cut by its limit still lists
# each test that passed or failed; the bench rewrites its JSON after every row.
set -uo pipefail

dry=0
only=""
out=""
while (($#)); do
  case $1 in
    --dry-run) dry=1 ;;
    --stages) only=${2:?--stages needs a list}; shift ;;
    --stages=*) only=${1#--stages=} ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
out=${out:-${OUT:-gpu_check_out}}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
total=${GPU_CHECK_BUDGET_S:-480}
site=${GPU_CHECK_SITE:-/tmp/grove_site}

# name:budget seconds. The bench's budget is a floor: it also gets whatever earlier stages
# left unused, minus what the stages after it reserve. OPTIONAL stages reserve nothing: they
# run on what is left (coactive: when the uniform bench ends early).
STAGES=(build:50 selfcheck:30 tests:70 cuda:60 sanitize:30 bench:160 settings:70 kernels:40
        coactive:35 summary:10)
OPTIONAL=" kernels coactive "
# The settings stage: name|environment|bench arguments, one run each (uniform routing).
SETTINGS=(
  "fused|GROVE_CUDA_FUSE_SWIGLU=1|--pass fwd --backends cuda --variants grove,plain --layout folded,sections"
  "tiles|GROVE_TRITON_SCHEDULE=tiles|--pass both --backends triton --variants grove --layout folded"
  "2persm|GROVE_TRITON_PROGRAMS=264|--pass fwd --backends triton --variants grove --layout folded"
)

export PYTHONPATH="$site:$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
variants=grove,plain
if [[ -d .anchors/vllm/shim ]]; then
  export PYTHONPATH="$PWD/.anchors/vllm/shim:$PYTHONPATH"
  variants+=,vllm
fi
tokens=16384,4096,1024,256,64,1
# The kernel backends this machine runs (cuda only when the build stage produced it).
pick_backends="B=\$(\"$PY\" -c \"import grove_kernels as gk; print(','.join(b for b in ('triton', 'cuda') if b in gk.available_backends()))\")"

# The bench of one routing: one run with the layout axis, or, where this checkout's bench has
# no --layout, one run per layout through GROVE_ADJUGATE_LAYOUT (JSON files named by layout,
# which the summary reads the layout from).
bench_cmd() {  # routing tokens lines
  cat <<EOF
$pick_backends
if "$PY" -m bench --help | grep -q -- --layout; then
  "$PY" -m bench --pass both --layout folded,sections --routing $1 --tokens $2 \\
    --variants $variants --backends "\$B" --quick --json "$out/bench_$1.json" 2>&1 | tail -$3
else
  echo "this bench has no --layout: one run per layout (GROVE_ADJUGATE_LAYOUT), T in two parts"
  part=0
  for toks in \$(echo $2 | cut -d, -f1-2) \$(echo $2 | cut -d, -f3-); do
    part=\$((part + 1))
    GROVE_ADJUGATE_LAYOUT=folded "$PY" -m bench --pass both --routing $1 --tokens \$toks \\
      --variants grove --backends "\$B" --quick \\
      --json "$out/bench_$1_\${part}_folded.json" 2>&1 | tail -$3
    GROVE_ADJUGATE_LAYOUT=sections "$PY" -m bench --pass both --routing $1 --tokens \$toks \\
      --variants $variants --backends "\$B" --quick \\
      --json "$out/bench_$1_\${part}_sections.json" 2>&1 | tail -$3
  done
fi
EOF
}

stage_cmd() {
  case $1 in
    build) cat <<EOF
mkdir -p "$site"
ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/nvidia_cutlass-*.whl
GROVE_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | tail -20
"$PY" -c "import grove_kernels.cuda as c; i = c.build_info(); print(i); raise SystemExit(0 if i['backend_available'] else 1)"
EOF
      ;;
    selfcheck) cat <<EOF
rc=0
for layout in sections folded; do
  echo "== GROVE_ADJUGATE_LAYOUT=\$layout"
  GROVE_ADJUGATE_LAYOUT=\$layout "$PY" -m grove_kernels.selfcheck || rc=1
done
exit \$rc
EOF
      ;;
    tests) cat <<EOF
GROVE_TEST_BACKENDS=torch,triton "$PY" -m pytest -v -rfs --tb=line -p no:cacheprovider \\
  ${GPU_CHECK_TESTS:--m gpu tests --ignore-glob='tests/test_cuda*' --ignore=tests/test_distributed.py}
EOF
      ;;
    cuda) cat <<EOF
GROVE_TEST_BACKENDS=cuda "$PY" -m pytest -v -m gpu -rfs --tb=line -p no:cacheprovider \\
  tests/test_api_gpu.py \$(ls tests/test_cuda*gpu*.py tests/test_*folded*cuda*.py tests/test_cuda*folded*.py 2>/dev/null | sort -u)
EOF
      ;;
    sanitize) cat <<EOF
compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" - <<'PYEOF'
import os, torch, grove_kernels as gk
assert "cuda" in gk.available_backends(), "cuda backend not available"
g = torch.Generator().manual_seed(0)
T, H, E, k, I, S, Ia = 37, 256, 16, 4, 96, 2, 32
def r(*s, scale=1.0):
    return (torch.randn(*s, generator=g) * scale).cuda().to(torch.bfloat16).requires_grad_()
for layout in ("sections", "folded"):
    os.environ["GROVE_ADJUGATE_LAYOUT"] = layout
    x, w1, w2 = r(T, H), r(E, 2 * I, H, scale=H ** -0.5), r(E, H, I, scale=I ** -0.5)
    a1, a2 = r(E // S, 2 * Ia, H, scale=H ** -0.5), r(E // S, H, Ia, scale=Ia ** -0.5)
    logits = torch.randn(T, E, generator=g).cuda().requires_grad_()
    with gk.use_backend("cuda"):
        y = gk.grove_moe(x, logits, w1, w2, a1, a2, top_k=k, group_size=S)
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    print(layout, "ok", float(y.detach().float().norm()))
    # The inference forward on the fused GEMM-1 + SwiGLU (its shared-memory epilogue).
    gk.settings.set_fuse_swiglu(True)
    with torch.no_grad(), gk.use_backend("cuda"):
        y = gk.grove_moe(x.detach(), logits.detach(), w1.detach(), w2.detach(), a1.detach(),
                         a2.detach(), top_k=k, group_size=S)
    gk.settings.set_fuse_swiglu("auto")
    torch.cuda.synchronize()
    print(layout, "fused ok", float(y.float().norm()))
PYEOF
EOF
      ;;
    bench) bench_cmd uniform "$tokens" 80 ;;
    settings)
      local entry name env args
      for entry in "${SETTINGS[@]}"; do
        IFS='|' read -r name env args <<< "$entry"
        cat <<EOF
echo "== $name: $env"
env $env "$PY" -m bench $args --routing uniform --tokens $tokens --quick \\
  --json "$out/bench_uniform@$name.json" 2>&1 | tail -30
EOF
      done
      ;;
    kernels) cat <<EOF
$pick_backends
"$PY" -m bench.kernels --tokens 16384,1024 --backends "\$B" --variants $variants \\
  --json "$out/kernels.json"
EOF
      ;;
    coactive) bench_cmd coactive 16384,4096 40 ;;
    summary) cat <<EOF
"$PY" scripts/gpu_summary.py "$out"/bench_*.json
EOF
      ;;
  esac
}

selected() {
  [[ -z $only ]] && return 0
  [[ ",$only," == *",$1,"* ]]
}

# Seconds the stages after index $1 reserve (selected ones only).
reserve_after() {
  local i sum=0
  for ((i = $1 + 1; i < ${#STAGES[@]}; i++)); do
    [[ $OPTIONAL == *" ${STAGES[i]%%:*} "* ]] && continue
    selected "${STAGES[i]%%:*}" && sum=$((sum + ${STAGES[i]##*:}))
  done
  echo "$sum"
}

if ((dry)); then
  echo "gpu_check: total budget ${total}s; OUT_DIR $out"
  sum=0
  for s in "${STAGES[@]}"; do
    name=${s%%:*} budget=${s##*:}
    selected "$name" || continue
    if [[ $OPTIONAL == *" $name "* ]]; then
      echo "stage $name ${budget}s optional (runs on the time left)"
    else
      sum=$((sum + budget))
      echo "stage $name ${budget}s"
    fi
    stage_cmd "$name" | sed 's/^/    /'
  done
  echo "sum of stage budgets ${sum}s"
  ((sum <= total)) || { echo "stage budgets exceed the total" >&2; exit 1; }
  exit 0
fi

mkdir -p "$out"
: > "$out/stages.txt"
start=$SECONDS
run_stage() {  # index name budget
  local i=$1 name=$2 budget=$3 left limit rc t0 status
  left=$((total - (SECONDS - start)))
  limit=$((left - $(reserve_after "$i")))
  if [[ $name == bench ]]; then
    ((limit < budget)) && limit=$budget
  elif ((limit > budget)); then
    limit=$budget
  fi
  ((limit > left)) && limit=$left
  local least=10
  [[ $OPTIONAL == *" $name "* ]] && least=20
  if ((limit < least)); then
    echo "$name SKIPPED (${left}s left)" >> "$out/stages.txt"
    echo "== $name: skipped (${left}s left)"
    return
  fi
  echo "== $name (limit ${limit}s)"
  t0=$SECONDS
  if [[ $name == summary ]]; then  # the last thing printed, in full
    timeout -k 5 "$limit" bash -c "$(stage_cmd "$name")" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 5 "$limit" bash -c "$(stage_cmd "$name")" > "$out/$name.log" 2>&1
    rc=$?
    tail -15 "$out/$name.log"
  fi
  status=ok
  ((rc == 124 || rc == 137)) && status=TIMEOUT
  ((rc != 0 && rc != 124 && rc != 137)) && status=FAILED
  echo "$name $status rc=$rc $((SECONDS - t0))s" >> "$out/stages.txt"
  [[ $name == summary ]] || echo "== $name: $status (rc $rc, $((SECONDS - t0))s)"
}
last=$((${#STAGES[@]} - 1))
for i in "${!STAGES[@]}"; do
  ((i == last)) && break
  selected "${STAGES[i]%%:*}" && run_stage "$i" "${STAGES[i]%%:*}" "${STAGES[i]##*:}"
done
echo "== stages"
cat "$out/stages.txt"
selected "${STAGES[last]%%:*}" && run_stage "$last" "${STAGES[last]%%:*}" "${STAGES[last]##*:}"
exit 0
