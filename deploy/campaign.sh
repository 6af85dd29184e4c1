#!/usr/bin/env bash
# A fault-injection campaign: every mode and signal for several seeds.
# A thin wrapper over `uksm campaign` (docs/CAMPAIGN.md), kept for its old
# usage:  deploy/campaign.sh [OUT] [KILLS] [SEEDS...]
#   e.g. deploy/campaign.sh campaign-out 200 1 2 3
# Results in OUT/campaign.jsonl (one JSON line per run; --resume to
# complete an interrupted campaign), failing runs' logs in OUT/campaign.logs.
# Exits non-zero if any run did not end clean.  Extra `uksm campaign`
# options go in $UKSM_CAMPAIGN_OPTS (e.g. "--engine ray --address auto").
set -eu
out=${1:-campaign-$(date +%Y%m%d-%H%M%S)}; kills=${2:-200}; shift 2 2>/dev/null || shift $#
seeds=${*:-1 2 3}
mkdir -p "$out"
# shellcheck disable=SC2086  # the options are words
exec ${UKSM:-uksm} campaign --seeds "$(echo $seeds | tr ' ' ,)" --points random,cursor,all \
  --signals KILL,TERM --kills "$kills" --workers 4 --pages 256 \
  --out "$out/campaign.jsonl" --resume ${UKSM_CAMPAIGN_OPTS:-}
