#!/usr/bin/env bash
# A fault-injection campaign: `uksm inject` over every mode and signal for
# several seeds, one JSON report per run in OUT/, one summary line per run.
# Usage: deploy/campaign.sh [OUT] [KILLS] [SEEDS...]
#   e.g. deploy/campaign.sh campaign-out 200 1 2 3
# Exits non-zero if any run did not end clean (status 0).
set -u
out=${1:-campaign-$(date +%Y%m%d-%H%M%S)}; kills=${2:-200}; shift 2 2>/dev/null || shift $#
seeds=${*:-1 2 3}
uksm=${UKSM:-uksm}
mkdir -p "$out"
fail=0
for seed in $seeds; do
  for mode in random cursor all; do
    for sig in KILL TERM; do
      tag="$seed.$mode.$sig"
      mkdir -p "$out/logs.$tag"
      start=$(date +%s.%N)
      $uksm inject --kills "$kills" --point "$mode" --signal "$sig" --seed "$seed" --json --quiet \
        --log-dir "$out/logs.$tag" > "$out/$tag.json"
      rc=$?
      secs=$(python3 -c "import time,sys; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$start")
      python3 - "$out/$tag.json" "$tag" "$rc" "$secs" <<'PY'
import json, sys
path, tag, rc, secs = sys.argv[1:]
try:
    r = json.load(open(path)); i = r["inject"]
    print(f"{tag:22} status {rc}  {secs:>6}s  kills {i['kills']:4}  recoveries {i['recoveries']:4}  "
          f"lock recoveries {i['lock_recoveries']:4}  merges after {i['merges_after_kills']:5}  "
          f"fsck {'ok' if r['fsck']['ok'] and i['live_fsck']['ok'] else 'FAIL'}  "
          f"mismatches {r['integrity']['mismatches']}  leftovers {len(r['ipc_leftovers'])}  "
          f"hung {len(r['hung_tasks'])}")
except Exception as e:  # no report: the run itself failed
    print(f"{tag:22} status {rc}  {secs:>6}s  no report ({e})")
PY
      [ "$rc" = 0 ] || fail=1
    done
  done
done
exit $fail
