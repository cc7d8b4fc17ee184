#!/usr/bin/env bash
# Run benchmarks/qat.py jobs side by side on one GPU (how benchmarks/results/qat.jsonl was made).
# Each line of JOBS (default benchmarks/qat_jobs.txt) is  model|runs|epochs[|extra args]; each job is one
# process with 2 CPU threads (more threads per process made 11 processes 5x slower on 16 cores).
# Records and logs go to $OUT (default ./out/qat): qat.jsonl, logs.txt, plans/.
#   SLIMTORCH_FMNIST_DIR=... bash benchmarks/qat_parallel.sh
#   JOBS=my_jobs.txt T=545 bash benchmarks/qat_parallel.sh
# The job lists behind the H100 records, with their commits: benchmarks/notes/qat_jobs.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/qat}; mkdir -p "$OUT"
export PYTHONPATH=src OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
R=$(mktemp -d); i=0
while IFS="|" read -r m runs ep extra; do
  [ -z "$m" ] && continue
  i=$((i+1)); mkdir -p "$R/p$i"
  # shellcheck disable=SC2086
  timeout "${T:-530}" python benchmarks/qat.py --models "$m" --runs "$runs" --epochs "$ep" $extra --out "$R/p$i" \
    > "$R/p$i/log.txt" 2>&1 &
done < "${JOBS:-benchmarks/qat_jobs.txt}"
wait
cat "$R"/p*/qat.jsonl >> "$OUT/qat.jsonl" 2>/dev/null
for f in "$R"/p*/log.txt; do echo "== $f"; tail -c 3000 "$f"; done > "$OUT/logs.txt"
mkdir -p "$OUT/plans"; cp "$R"/p*/plans/*.json "$OUT/plans/" 2>/dev/null
grep -h "top-1\|Error" "$R"/p*/log.txt
