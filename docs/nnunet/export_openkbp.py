"""Export OpenKBP (../shared/data/openkbp-hn) as an nnU-Net v2 raw dataset, for the nnU-Net comparison in
docs/headneck.md (issue 20, item 4).

    python docs/nnunet/export_openkbp.py --data ../shared/data/openkbp-hn --out /work/nnunet_data/raw

writes OUT/Dataset501_OpenKBP/{imagesTr,labelsTr,dataset.json} with the 167 cases of splits.json "train", and
OUT/Dataset501_OpenKBP/imagesVal with the 32 cases of "validation" (input for nnUNetv2_predict; nnU-Net never
sees their labels). Images and labels are symbolic links to the read-only data (no copy, nothing rewritten):
the files already are NIfTI with image and label on one grid, which is all nnU-Net needs.

Partial labels: nnU-Net v2 has no notion of "this organ was not contoured in this case" short of its
ignore label, which marks voxels, not organs, and would have to cover the whole volume. A user of nnU-Net
therefore trains on the label maps as they are, where an organ that was not contoured is background. That is
what this export does and what the comparison measures; evaluation (ours and nnU-Net's alike) then scores only
the organs annotations.json lists for each case (`sdmorganseg evaluate --ignore-unannotated`).
"""

import argparse
import json
import os
import sys

DATASET = "Dataset501_OpenKBP"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the openkbp-hn folder (imagesTr, labelsTr, splits.json, labels.json)")
    parser.add_argument("--out", required=True, help="nnU-Net raw folder ($nnUNet_raw); keep it outside the repository")
    args = parser.parse_args(argv)

    data = os.path.abspath(args.data)
    for name in ("splits.json", "labels.json", "imagesTr", "labelsTr"):
        if not os.path.exists(os.path.join(data, name)):
            sys.exit(f"error: {data} has no {name}; pass the openkbp-hn folder with --data")
    splits = json.load(open(os.path.join(data, "splits.json")))
    labels = json.load(open(os.path.join(data, "labels.json")))["labels"]

    root = os.path.join(os.path.abspath(args.out), DATASET)
    if os.path.exists(root):
        sys.exit(f"error: {root} exists; remove it or choose another --out (nothing is overwritten)")
    folders = {name: os.path.join(root, name) for name in ("imagesTr", "labelsTr", "imagesVal")}
    for folder in folders.values():
        os.makedirs(folder)

    def link(source, target):
        if not os.path.exists(source):
            sys.exit(f"error: {source} is missing; is --data the complete openkbp-hn folder?")
        os.symlink(source, target)

    for case in splits["train"]:
        link(os.path.join(data, "imagesTr", case + ".nii.gz"), os.path.join(folders["imagesTr"], case + "_0000.nii.gz"))
        link(os.path.join(data, "labelsTr", case + ".nii.gz"), os.path.join(folders["labelsTr"], case + ".nii.gz"))
    for case in splits["validation"]:
        link(os.path.join(data, "imagesTr", case + ".nii.gz"), os.path.join(folders["imagesVal"], case + "_0000.nii.gz"))

    # nnU-Net v2's dataset.json: label name -> value, background 0; "CT" selects its CT normalisation
    # (clip to the foreground's 0.5-99.5 percentiles, z-score with the foreground's mean and std).
    names = {"background": 0}
    names.update({name: int(value) for value, name in sorted(labels.items(), key=lambda item: int(item[0]))})
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": names,
        "numTraining": len(splits["train"]),
        "file_ending": ".nii.gz",
        "name": "OpenKBP",
        "description": "OpenKBP head-and-neck OARs, splits.json train (167); organs not contoured in a case are background",
        "reference": "Babier et al., Medical Physics 2021 (OpenKBP); CT from TCIA",
    }
    with open(os.path.join(root, "dataset.json"), "w") as handle:
        json.dump(dataset, handle, indent=1)
    print(f"{root}: {len(splits['train'])} training cases, {len(splits['validation'])} in imagesVal")


if __name__ == "__main__":
    main()
