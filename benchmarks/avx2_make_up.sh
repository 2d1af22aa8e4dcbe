#!/bin/bash
# make up on a fresh clone with torch and oneDNN held to AVX2 kernels (an emulation of an AVX2-only CPU's software
# path on this machine: same cores and clock), fresh LLMESH_HOME (models built from scratch); time to first token.
set -u
rm -rf /tmp/avx2-clone /tmp/avx2-home
git clone -q /work/main /tmp/avx2-clone
cd /tmp/avx2-clone
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 LLMESH_HOME=/tmp/avx2-home
t0=$(date +%s.%N)
make up > /tmp/avx2-up.log 2>&1 &
mk=$!
while ! grep -q "ready; router at" /tmp/avx2-up.log; do
  sleep 2
  if ! kill -0 $mk 2>/dev/null; then echo "make up exited early"; tail -30 /tmp/avx2-up.log; exit 1; fi
done
t_ready=$(date +%s.%N)
.venv/bin/llmesh generate "The meaning of" --max-tokens 16 > /tmp/avx2-gen.out 2> /tmp/avx2-gen.err
t_done=$(date +%s.%N)
python3 - "$t0" "$t_ready" "$t_done" <<'PY'
import sys; t0, r, d = map(float, sys.argv[1:]); print(f"ready after {r - t0:.0f} s; generate done after {d - t0:.0f} s")
PY
cat /tmp/avx2-gen.err
grep -h "built in\|models in\|seed 0" /tmp/avx2-up.log | tail -6
grep -o '"bf16_autocast": [a-z]*' /tmp/avx2-home/models/*/build-report.json 2>/dev/null | head
pkill -INT -f "llmesh up" ; sleep 5
