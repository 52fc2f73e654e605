#!/bin/bash
# Final GPU checks: kernel parity, 8B serving vs HF generate, a GPU LoRA job through qctl up, GPU infer and
# LoRA adapters served by name on the GPU.
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:$LD_LIBRARY_PATH
export NCCL_NVLS_ENABLE=0 QCLUSTER_CUDA_INCLUDE=/usr/local/cuda/include QCLUSTER_NVRTC_CACHE=/tmp/nvrtc
F=$PWD/.gpu/final; L=$OUT; export HOME=/tmp/home; mkdir -p $HOME
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== cuda_parity (all cases)"; timeout 200 $F/cuda_parity --skip-bench > $L/parity.log 2>&1; echo "rc $?"; grep -E "checks|FAIL" $L/parity.log | tail -4
echo "== serve: ours"; timeout 150 $F/qcluster-gpu-bench serve --model qwen3-8b --concurrency 1,16,64 --prompt-len 128 --new-tokens 128 > $L/serve.log 2>&1; echo "rc $?"; grep -E "^\{|GiB" $L/serve.log
echo "== serve: HF generate"; for b in 1 16 64; do timeout 120 python3 $F/torch_generate.py qwen3-8b $b 128 128 2>&1 | tail -1; done
echo "== GPU LoRA SFT through qctl up (resources.gpus_per_node: 1)"
sed 's/^resources:.*/resources: {gpus_per_node: 1}/' examples/self-cognition.yaml > /tmp/sc-gpu.yaml; grep -n "^resources" /tmp/sc-gpu.yaml
timeout 150 $F/qctl up --run /tmp/sc-gpu.yaml > $L/up.log 2>&1; echo "rc $?"; grep -iE "cuda|succeeded|failed|state" $L/up.log | head -8; tail -3 $L/up.log
CK=output/self-cognition/checkpoint-600
echo "== qctl infer --device cuda"; for p in "你是谁？" "who are you?"; do timeout 60 $F/qctl infer --model $CK --device cuda --prompt "$p" --temperature 0 --max-new-tokens 40 2>>$L/infer.err; done
echo "== qctl serve --device cuda --adapters robot=$CK"
$F/qctl serve --model configs/models/qwen3-tiny-chat --served-model-name tiny --device cuda --adapters robot=$CK --listen 127.0.0.1:8011 > $L/serve-http.log 2>&1 &
for i in $(seq 60); do curl -s localhost:8011/health >/dev/null && break; sleep 1; done
curl -s localhost:8011/v1/models | python3 -c "import json,sys; print([(m['id'], m.get('parent')) for m in json.load(sys.stdin)['data']])"
for m in robot tiny; do curl -s localhost:8011/v1/chat/completions -H 'content-type: application/json' -d "{\"model\":\"$m\",\"messages\":[{\"role\":\"user\",\"content\":\"who are you?\"}],\"temperature\":0,\"max_tokens\":30}" | python3 -c "import json,sys; v=json.load(sys.stdin); print('$m:', v['choices'][0]['message']['content'][:120])"; done
kill %1; wait
