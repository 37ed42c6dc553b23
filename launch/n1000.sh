#!/usr/bin/env bash
# The N = 1,000 experiment end to end (issue 14), resumable: build the 1,000-person
# library, evaluate the tuning half and the test half, analyse routing at N = 1,000 on
# the tuning half, evaluate the test half through the arrow sketch, the same test at
# N = 250 / 64 / 16 drawn from the same library, and gather the curve over N. Hours on
# 2 CPU cores (the build alone ~4.4-9.4 h, by host; each half ~1 h).
#
#   nohup launch/n1000.sh > /dev/null 2>&1 &         # ROOT=$HOME/lag_n1000, OUT=results/n1000
#   ROOT=/data/lag_n1000 OUT=/tmp/n1000 launch/n1000.sh
#
# Every step runs at low priority (nice 19) and is itself resumable (finished adapters and
# finished methods are kept), so rerunning this script after any interruption goes on
# where it stopped; $ROOT/<step>.done marks finished steps, $ROOT/<step>.log is each
# step's log, and $ROOT/wall.log has one line per step start, finish or failure (with
# the pauses you add by hand, it gives the total wall time). Two copies never run at
# once ($ROOT/.lock).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${ROOT:-$HOME/lag_n1000}"
OUT="${OUT:-results/n1000}"
mkdir -p "$ROOT"
exec 9> "$ROOT/.lock"
flock -n 9 || { echo "launch/n1000.sh: another run holds $ROOT/.lock" >&2; exit 1; }

stamp() { echo "$(date -u +%FT%TZ) $*" >> "$ROOT/wall.log"; }

step() {  # step NAME ARGS...: python -m lag_jax.run ARGS, once
  local name=$1
  shift
  [ -e "$ROOT/$name.done" ] && return 0
  stamp "start $name"
  if ! nice -n 19 python -m lag_jax.run "$@" > "$ROOT/$name.log" 2>&1; then
    stamp "FAIL $name (see $ROOT/$name.log)"
    exit 1
  fi
  touch "$ROOT/$name.done"
  stamp "done $name"
}

cfg=configs/n1000.py
step build --config=$cfg:build --workdir="$ROOT/build" --config.library_root="$ROOT"
step tune --config=$cfg:tune --workdir="$ROOT/tune" --config.library_root="$ROOT"
step test --config=$cfg:test --workdir="$ROOT/test" --config.library_root="$ROOT"

# Routing at N = 1,000 on the tuning half: per-request and per-token accuracy, the
# analysis of what misleads the vote, and the arrow index's effect on the same inputs.
# After the test half: the routers the analysis pointed to were tried on the tuning half
# (RESULTS.md) and are in the test run's method list; the sketch's test run below takes
# its setting from this step's recall.
step scale_tune --config=configs/synthetic_scale.py --workdir="$ROOT/scale_tune" \
  --config.library_root="$ROOT" --config.build=False --config.synthetic.split=tune \
  --config.sizes=1000 --config.analysis_sizes=1000 --config.k_sweep_sizes= \
  --config.index_sizes=1000 --config.index_probes=8,16,32 \
  --config.index_sketches=32:80,32:160,64:80,64:160,64:320,128:160,128:320 \
  "--config.routers=LAG,Arrow,Vote,Vote-score,ReqLAG,Vote-final2(score=score),Vote-final2(score=margin),Vote(vote_modules=down_proj)" \
  "--config.shared_routers=Vote,Vote-score,Vote-final2(score=score),Vote-final2(score=margin)"

# The arrow sketch end to end on the test half (one index kind per evaluate run, so apart
# from the main run's LAG+index): the paper's LAG and the demo's router (a vote over the
# prompt's tokens, so the sketch filters prefill tokens too: index_prefill=1), each beside
# its exact run. The setting (dimensions, pool) is the cheapest whose recall of the exact
# top 20 is >= 99% on the tuning half's requests at N = 1,000 (scale_tune's index_effect).
# Oracle and the exact runs are the test step's (the same questions and libraries; the
# index settings key only the methods that read the index): seed them, do not rerun.
SKETCH="pool=160;sketch=64"
ROUTER="Vote-final2(k=4;score=score;removal=mean:4;finalists=5)"
mkdir -p "$ROOT/test_sketch/method_runs"
cp -n "$ROOT"/test/method_runs/*.json "$ROOT/test_sketch/method_runs/" 2>/dev/null || true
step test_sketch --config=$cfg:test --workdir="$ROOT/test_sketch" --config.library_root="$ROOT" \
  "--config.methods=Oracle,LAG,LAG+sketch(k=20;$SKETCH;index_prefill=1),$ROUTER,${ROUTER%)};$SKETCH;index_prefill=1)" \
  --config.k_sweep=

for n in 250 64 16; do  # the curve over N: the same library's first n adapters
  step "test_n$n" --config=$cfg:test --workdir="$ROOT/test_n$n" --config.library_root="$ROOT" \
    --config.synthetic.library_size=$n --config.k_sweep=
done

mkdir -p "$OUT/tune" "$OUT/test" "$OUT/test_sketch" "$OUT/scale_tune"
for half in tune test test_sketch; do
  cp "$ROOT/$half/results.json" "$ROOT/$half/results.md" "$OUT/$half/"
done
cp "$ROOT"/scale_tune/*.json "$ROOT"/scale_tune/*.md "$ROOT"/scale_tune/*.png "$OUT/scale_tune/"
python -m lag_jax.eval.curve --run=16:"$ROOT/test_n16" --run=64:"$ROOT/test_n64" \
  --run=250:"$ROOT/test_n250" --run=1000:"$ROOT/test" --out="$OUT/curve"
stamp "done all (results in $OUT)"
