#!/bin/bash
# The nnU-Net comparison of docs/headneck.md ("nnU-Net on the same CPU budget"), step by step.
# Run from the repository root. NN holds nnU-Net's data, checkpoints and predictions: keep it outside the
# repository. DATA is the read-only openkbp-hn folder. Takes about 4 hours on one core.
set -euo pipefail
NN=${NN:-/work/nnunet_data}
DATA=${DATA:-../shared/data/openkbp-hn}
VENV=${VENV:-.venv-nnunet}

# 1. nnU-Net's own environment, torch pinned to ours (2.13.0, the CPU build).
[ -x "$VENV/bin/python" ] || { python3.11 -m venv "$VENV" && "$VENV/bin/pip" install -r docs/nnunet/requirements-nnunet.lock; }

export nnUNet_raw=$NN/raw nnUNet_preprocessed=$NN/preprocessed nnUNet_results=$NN/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 BLOSC_NTHREADS=1 nnUNet_compile=f

# 2. Raw dataset (167 training cases; organs not contoured in a case are background) and nnU-Net's planning
#    and preprocessing, 3d_fullres only.
python3 docs/nnunet/export_openkbp.py --data "$DATA" --out "$nnUNet_raw"
"$VENV/bin/nnUNetv2_plan_and_preprocess" -d 501 -c 3d_fullres -np 2 -npfp 2 --verify_dataset_integrity

# 3. Training: one thread, data augmentation in the training process (nnUNet_n_proc_DA=0), BUDGET minutes of
#    wall time (180: the cap; the first run had 100). A session that ends first resumes with CONTINUE=--c.
NNUNET_TORCH_THREADS=1 nnUNet_n_proc_DA=0 nnUNet_budget_minutes=${BUDGET:-180} nnUNet_snapshot_minutes=${SNAPSHOT:-180} \
    "$VENV/bin/python" docs/nnunet/run_nnunet.py train 501 3d_fullres all -tr nnUNetTrainerBudget -device cpu ${CONTINUE:-}

# 4. The 32 validation cases: nnU-Net (no mirroring TTA, see docs/headneck.md) and our shipped model.
CHECKPOINT=${CHECKPOINT:-checkpoint_final.pth}
NNUNET_TORCH_THREADS=1 nnUNet_n_proc_DA=0 "$VENV/bin/python" docs/nnunet/run_nnunet.py predict \
    -i "$nnUNet_raw/Dataset501_OpenKBP/imagesVal" -o "$NN/pred" -d 501 -c 3d_fullres -f all \
    -tr nnUNetTrainerBudget -chk "$CHECKPOINT" -device cpu --disable_tta -step_size 1 -npp 1 -nps 1
# Ours: the campaign's phase-7 dual model and the Dice-only preview, then shipped, both from the history (the
# model shipped since replaced them), the card's defaults, one thread.
mkdir -p "$NN/models"
git archive dd44f6c docs/campaign/hn-dual/model Resources/Models/headneck-oar | tar -x -C "$NN/models"
# And the model shipped now (2026-12-05, phase 21), by name.
for spec in "shipped=headneck-oar" "dual-phase7=$NN/models/docs/campaign/hn-dual/model" "headneck-oar=$NN/models/Resources/Models/headneck-oar"; do
    for case in $(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['validation']))" "$DATA/splits.json"); do
        [ -f "$NN/ours-${spec%%=*}/$case/labels.nii.gz" ] || OMP_NUM_THREADS=1 PYTHONPATH=$PWD/SDMOrganSeg python -m SDMOrganSegLib.cli segment \
            "$DATA/imagesTr/$case.nii.gz" --model "${spec#*=}" --out "$NN/ours-${spec%%=*}/$case" --device cpu --quiet
    done
done

# 5. Scores with `sdmorganseg evaluate --ignore-unannotated` and paired Wilcoxon tests (against the first --pred).
#    On 2026-12-05 the three older methods' predictions were gone; their rows came from the committed CSV with
#    --pred "headneck-oar (shipped, phase 21)=..." --scored docs/nnunet/validation_per_case.csv.
PYTHONPATH=$PWD/SDMOrganSeg python docs/nnunet/score_validation.py --data "$DATA" \
    --pred "headneck-oar (shipped, phase 21)=$NN/ours-shipped/{case}/labels.nii.gz" \
    --pred "dual (phase 7)=$NN/ours-dual-phase7/{case}/labels.nii.gz" \
    --pred "headneck-oar (Dice-only preview)=$NN/ours-headneck-oar/{case}/labels.nii.gz" \
    --pred "nnU-Net 3d_fullres=$NN/pred/{case}.nii.gz" \
    --work "$NN/scores" --csv docs/nnunet/validation_per_case.csv --markdown docs/nnunet/validation_table.md
