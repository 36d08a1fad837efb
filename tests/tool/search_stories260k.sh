#!/usr/bin/env bash
# The dash tool end to end on stories260K: a run whose search is interrupted by SIGINT and
# resumed ends exactly where an uninterrupted run ends; a run is a function of its seed; bad
# input gets a clear message and status 2; a missing output folder is created.
#   search_stories260k.sh DASH_BINARY FIXTURES_DIR
set -uo pipefail
dash=$1
fixtures=$2
model=(--model "$fixtures/stories260K/stories260K.bin" --tokenizer "$fixtures/stories260K/tok512.bin")
common=(--ops softmax,swa:32,gla --budget softmax-layers=1 --seq-len 64 --prepare-tokens 2048 --eval-tokens 512
        --retrieval-contexts 512 --retrieval-prompts 1 --random-baselines 2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
check() {  # check DESCRIPTION COMMAND...
  if "${@:2}"; then echo "ok    $1"; else echo "FAIL  $1"; failures=$((failures + 1)); fi
}
expect_error() {  # expect_error DESCRIPTION MESSAGE_PART ARGS...
  local out status
  out=$("$dash" "${@:3}" 2>&1)
  status=$?
  if [ "$status" -eq 2 ] && grep -qF -- "$2" <<<"$out"; then echo "ok    $1"
  else echo "FAIL  $1 (status $status): $out"; failures=$((failures + 1)); fi
}
# Everything a search decides, without the wall-clock columns (tokens, seconds).
decisions() { cut -d, -f1,4- "$1/search_log.csv"; grep -v '"seconds"' "$1/arch.json"; }
# interrupted DIR SIGNAL...: the seed-3 search in DIR (from run a's candidates), sent each signal
# once 40 steps are logged; its exit status in $status, its output in DIR.log.
interrupted() {
  local dir=$1 pid
  mkdir -p "$dir"
  cp "$work/a/nested/candidates.safetensors" "$dir/"
  "$dash" search "${model[@]}" "${common[@]}" --tokens 40960 --seed 3 --out "$dir" >"$dir.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 400); do
    [ -f "$dir/search_log.csv" ] && [ "$(wc -l <"$dir/search_log.csv")" -ge 40 ] && break
    sleep 0.05
  done
  for signal in "${@:2}"; do kill "-$signal" "$pid"; done
  wait "$pid"
  status=$?
}

# An uninterrupted run, twice with one seed and once with another.
"$dash" run "${model[@]}" "${common[@]}" --tokens 40960 --seed 3 --out "$work/a/nested" >"$work/a.log" 2>&1
check "run completes and creates its output folder" test -s "$work/a/nested/arch.json"
for f in candidates.safetensors arch.json search_log.csv search.ckpt eval.json report.svg; do
  check "run writes $f" test -s "$work/a/nested/$f"
done
check "arch.json has Hugging Face layer_types" grep -q '"layer_types"' "$work/a/nested/arch.json"
check "report.svg is an SVG document" grep -q '</svg>' "$work/a/nested/report.svg"
decisions "$work/a/nested" >"$work/a.decisions"
"$dash" search "${model[@]}" "${common[@]}" --tokens 40960 --seed 3 --out "$work/a/nested" >/dev/null 2>&1
check "a search with the same seed decides the same" diff "$work/a.decisions" <(decisions "$work/a/nested")

# The same search interrupted by SIGINT once some steps are logged, then resumed.
interrupted "$work/b" INT
check "SIGINT exits with status 130" test "$status" -eq 130
check "SIGINT leaves a checkpoint" test -s "$work/b/search.ckpt"
check "the interrupted search stopped early" test "$(wc -l <"$work/b/search_log.csv")" -lt 641
"$dash" search "${model[@]}" "${common[@]}" --tokens 40960 --seed 3 --out "$work/b" --resume >>"$work/b.log" 2>&1
check "the resumed search completes" test -s "$work/b/arch.json" || cat "$work/b.log"
check "resumed == uninterrupted (every logged step and the architecture)" \
  diff "$work/a.decisions" <(decisions "$work/b")
"$dash" search "${model[@]}" "${common[@]}" --tokens 40960 --seed 4 --out "$work/b" >/dev/null 2>&1
check "another seed's search logs other steps" bash -c "! diff -q '$work/a.decisions' <(cut -d, -f1,4- '$work/b/search_log.csv') >/dev/null"

# The same signal twice at once (what `timeout` and process-group kills deliver) is one request:
# the search still stops at the end of its step and saves.
interrupted "$work/e" TERM TERM
check "SIGTERM twice at once exits with status 130" test "$status" -eq 130
check "... after saving a checkpoint" grep -q "interrupted at step" "$work/e.log"

# Calibration sequences that repeat their first half change what the search reads.
"$dash" search "${model[@]}" "${common[@]}" --tokens 40960 --seed 3 --copy-fraction 1 --out "$work/b" >/dev/null 2>&1
check "--copy-fraction 1 logs other steps than 0" bash -c "! diff -q '$work/a.decisions' <(cut -d, -f1,4- '$work/b/search_log.csv') >/dev/null"
check "... and arch.json records it" grep -q '"copy_fraction": 1' "$work/b/arch.json"

# Bad input.
expect_error "copy fraction above 1" "--copy-fraction: 2, expected 0" \
  search "${model[@]}" --copy-fraction 2 --out "$work/c"
expect_error "unknown op" "unknown operator 'mamba'" search "${model[@]}" --ops softmax,mamba --out "$work/c"
expect_error "empty op" "an empty operator name" search "${model[@]}" --ops softmax,,gla --out "$work/c"
expect_error "budget below the cheapest architecture" "below the cheapest architecture" \
  search "${model[@]}" --ops softmax,swa:32 --budget kv=0.001 --out "$work/c"
expect_error "budget of an unknown kind" "unknown kind" search "${model[@]}" --budget memory=1 --out "$work/c"
printf 'Once upon a time.' >"$work/short.txt"
expect_error "data shorter than one sequence" "expected more than one sequence" \
  prepare "${model[@]}" "${common[@]}" --data "$work/short.txt" --out "$work/c"
expect_error "search before prepare" "run \`dash prepare\`" search "${model[@]}" "${common[@]}" --out "$work/empty"
expect_error "resume without a checkpoint" "no checkpoint to resume" \
  search "${model[@]}" --ops softmax,swa:32 --budget softmax-layers=1 --resume --out "$work/empty2"
expect_error "eval before search" "run \`dash search\`" eval "${model[@]}" --ops softmax,swa:32 --out "$work/empty3"
expect_error "resume a checkpoint of another run" "from another run" \
  search "${model[@]}" "${common[@]}" --tokens 20480 --seed 3 --resume --out "$work/a/nested"

# A budget above the dearest architecture does not bind: every layer keeps softmax.
"$dash" search "${model[@]}" --ops softmax,swa:32 --budget kv=2 --seq-len 64 --tokens 4096 --out "$work/d" >"$work/d.log" 2>&1
check "a budget above the dearest architecture is said not to bind" grep -q "does not bind" "$work/d.log"
check "... and keeps softmax everywhere" grep -q '"full_attention", *"full_attention", *"full_attention", *"full_attention", *"full_attention"' \
  <(tr -d '\n ' <"$work/d/arch.json" | sed 's/,/, /g')

echo "$failures failure(s)"
[ "$failures" -eq 0 ]
