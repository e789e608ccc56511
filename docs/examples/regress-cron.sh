#!/bin/sh
# Nightly regression job for cron. Install with `crontab -e` and a line like:
#   30 2 * * * /srv/ragkit/docs/examples/regress-cron.sh >> /srv/ragkit/runs/regress/cron.log 2>&1
# Edit REPO and MODEL. Exit code: 0 no regression, 1 regression, 2 invalid comparison, 3 already running
# (cron mails the output when MAILTO is set and the script prints anything; the log keeps it too).
set -u
REPO=${REPO:-/srv/ragkit}                  # the ragkit checkout (its .venv is used)
MODEL=${MODEL:-default}                    # a local HF model directory, a .gguf file, or "default"
QUANT=${QUANT:-none}                       # none | nf4 | int8
SUITE=${SUITE:-evals/suites/nightly.yaml}  # 60 needle cells; regress_power.yaml (200) detects smaller drops
                                           # such as SmolLM2 fp32 -> NF4 (docs/regression.md), GPU-sized
RUNS=${RUNS:-$REPO/runs/regress}           # one directory per day: $RUNS/YYYY-MM-DD (reruns resume it)
BASELINE=${BASELINE:-$RUNS/baseline}       # promoted explicitly with --update-baseline, never implicitly

cd "$REPO" || exit 2
. .venv/bin/activate
export HF_HUB_OFFLINE=1
DAY=$(date -u +%F)
# First night only: there is no baseline yet -> run `regress-cron.sh --update-baseline` once by hand to make
# that run the baseline (arguments are passed on to evals.regress).
python -m evals.regress --suite "$SUITE" --model "$MODEL" --quant "$QUANT" \
    --baseline "$BASELINE" --runs-dir "$RUNS" --no-progress \
    --history "$RUNS/history.parquet" \
    --markdown "$RUNS/$DAY.md" --junit "$RUNS/$DAY.xml" "$@"
code=$?
[ $code -eq 1 ] && echo "REGRESSION: see $RUNS/$DAY.md and $RUNS/history.png"
exit $code
