#!/usr/bin/env bash
# The GPU tables in one prepared script (target: under 8 minutes on one H100/H200). Tables, in order:
#   mfu       the model FLOPs utilisation of DPO with a cached reference (and with a frozen copy, beside
#             it) on a Llama of about 1B parameters (anatomy.py --shape 1b --peak-tflops)
#   rollouts  rollout throughput, hf against vllm, on SmolLM2-135M (rollout_throughput.py --device cuda),
#             where vllm imports (skipped with a message where it does not: it is an optional extra)
#   grpo      a GRPO step against TRL's (against_trl_grpo.py --device cuda), where trl imports
#   dpo       offline DPO against TRL at SmolLM2-135M's shape, with and without prefix sharing, beside the
#             decoder-alone floor
#             (against_trl.py --device cuda --prefix-sharing --floor), where trl imports
#   anatomy   the DPO/ORPO forward-pass anatomy in bf16 (anatomy.py --device cuda --dtype bfloat16)
# The against-TRL tables are fp32 with one fresh process per framework. Needs a CUDA build of torch and
# `pip install -e '.[bench]'`. Results go to benchmarks/results/gpu/ (CSV, PNG; the printed tables are
# appended to gpu.log, each step with its wall time).
#
#   benchmarks/gpu.sh                 # every table; PEAK_TFLOPS (dense bf16) defaults to 989, an H100/H200 SXM
#   benchmarks/gpu.sh grpo dpo        # only the tables named
#   benchmarks/gpu.sh --smoke         # the same steps at the smallest shapes (on the GPU where CUDA is there):
#                                     # checks the script, ~4 min on 2 CPU cores; no faster on the H200 machine,
#                                     # where each fresh worker process took ~20 s to start
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
smoke=
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
tables=("${@:-mfu rollouts grpo dpo anatomy}")
tables=(${tables[*]})
for t in "${tables[@]}"; do
    [[ " mfu rollouts grpo dpo anatomy " == *" $t "* ]] || { echo "unknown table '$t': choose from mfu rollouts grpo dpo anatomy" >&2; exit 2; }
done
if [[ -n $smoke ]]; then
    if python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then on=cuda dtype=bfloat16; else on=cpu dtype=float32; fi
    device=(--device $on --dtype $dtype) shape=(--shape quick) peak=1 quick=(--quick)
    rollouts=(--device $on --prompts 2 --samples 2 --new_tokens 8 --repeats 1 --variants hf vllm-bf16)
    dpo=(--device $on --quick --prefix-sharing --floor) grpo=(--device $on --quick)
else
    python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --smoke to check the script on CPU")'
    device=(--device cuda --dtype bfloat16) shape=(--shape 1b) peak=${PEAK_TFLOPS:-989} quick=()
    rollouts=(--device cuda --variants hf hf-bf16 vllm vllm-bf16 vllm-bf16-compiled)
    dpo=(--device cuda --hidden 576 --layers 30 --heads 9 --intermediate 1536 --vocab 49152 --seq 512 --batch 2 --parity-pairs 2
         --repeats 1 --prefix-sharing --floor)
    grpo=(--device cuda --repeats 1)
fi
failed=()
step() {  # one table: a step that fails is reported and the next one still runs
    local started=$SECONDS
    echo "== $*"
    "$@" || { echo "!! failed (exit $?): $*"; failed+=("$2"); }
    echo "== $((SECONDS - started)) s"
}
mfu() {
    step python benchmarks/anatomy.py "${device[@]}" "${shape[@]}" --rounds 1 --peak-tflops "$peak" --name mfu_1b \
        --variants "DPO, cached reference" "DPO, frozen-copy reference" --out "$out"
}
rollouts() {
    if python -c 'import vllm' 2>/dev/null; then
        VLLM_ENABLE_V1_MULTIPROCESSING=0 step python benchmarks/rollout_throughput.py "${rollouts[@]}" \
            --name rollout_throughput --out "$out"
    else
        echo "rollout throughput skipped: vllm is not installed here (pip install 'lit-align[vllm]')"
    fi
}
has_trl() {
    python -c 'import trl' 2>/dev/null || { echo "against-TRL table skipped: trl is not installed here (pip install -e '.[bench]')"; false; }
}
grpo() { has_trl && step python benchmarks/against_trl_grpo.py "${grpo[@]}" --max-other-load 2 --out-dir "$out" || true; }
dpo() { has_trl && step python benchmarks/against_trl.py "${dpo[@]}" --max-other-load 2 --out-dir "$out" || true; }
anatomy() { step python benchmarks/anatomy.py "${device[@]}" --rounds 1 "${quick[@]}" --name anatomy_bf16 --out "$out"; }
{
    echo "==== $(date -u +%FT%TZ) gpu.sh ${smoke:+--smoke }${tables[*]}"
    for t in "${tables[@]}"; do "$t"; done
    if ((${#failed[@]})); then echo "failed: ${failed[*]}"; exit 1; fi
} 2>&1 | tee -a "$out/gpu.log"
