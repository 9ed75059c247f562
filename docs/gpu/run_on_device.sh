#!/usr/bin/env bash
# The command run on the lent GPU machine (docs/gpu/README.md): trains every run of campaign.py side by side
# for MINUTES and packs the results into $OUT (at most 8 files of 16 MB come back).
# Needs, beside the repository: .gpu/hippo.npz and .gpu/hn.npz (sdmorganseg pack) and .gpu/whl/ (edt's wheel).
set -u -o pipefail
MINUTES=${1:-5.5}
ONLY=${2:-}  # comma-separated run names of campaign.py (default: all)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/SDMOrganSeg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, scipy, safetensors, matplotlib, tqdm, edt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)" || exit 1
# MPS lets the runs' small kernels share the GPU at once instead of taking turns; without it they still run.
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then
  if timeout 30 python3 -c "import torch; x = torch.ones(1, device='cuda'); print('MPS client ok', float(x.sum()))"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; echo "MPS off (client failed)"
  fi
else
  echo "MPS not available"
fi
timeout $(( ${MINUTES%.*} * 66 + 150 )) python3 docs/gpu/campaign.py --packs .gpu --out /tmp/campaign --minutes "$MINUTES" --only "$ONLY" 2>&1 | tee "$OUT/campaign.log"
cd /tmp/campaign || exit 1
cp summary.json "$OUT/" 2>/dev/null
tar czf /tmp/results.tgz summary.json runs/*.log runs/*/log.csv runs/*/metrics.json runs/*/split.json models 2>/dev/null
split -b 15m /tmp/results.tgz "$OUT/results.tgz.part-"
ls -la "$OUT"
