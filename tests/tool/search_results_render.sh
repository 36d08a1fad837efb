#!/usr/bin/env bash
# scripts/search_results.py render on a fixture results folder: the section lands between the
# markers and nothing else in the README changes; every budget gets its table with the searched
# architecture, every baseline and the teacher, the random row the median of its seeds; the figure
# is well-formed SVG; rendering twice gives the same README; a README without markers is refused.
#   search_results_render.sh PYTHON SOURCE_DIR
set -uo pipefail
python=$1
source_dir=$2
fixture=$source_dir/tests/fixtures/search_results
render=("$python" "$source_dir/scripts/search_results.py" render --out "$fixture")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
check() {  # check DESCRIPTION COMMAND...
  if "${@:2}"; then echo "ok    $1"; else echo "FAIL  $1"; failures=$((failures + 1)); fi
}

printf '# A README\n\nbefore\n\n<!-- search-results:begin -->\nstale\n<!-- search-results:end -->\n\nafter\n' \
  >"$work/README.md"
"${render[@]}" --readme "$work/README.md" --figure "$work/docs/results.svg" >"$work/render.log" 2>&1
check "render succeeds" test $? -eq 0 || cat "$work/render.log"
section() { sed -n '/search-results:begin/,/search-results:end/p' "$1"; }
outside() { sed '/search-results:begin/,/search-results:end/d' "$1"; }
check "the text outside the markers is unchanged" \
  diff <(printf '# A README\n\nbefore\n\n\nafter\n') <(outside "$work/README.md")
check "the stale section is replaced" bash -c "! grep -q stale '$work/README.md'"
for budget in softmax-layers=1 softmax-layers=2 kv=0.5; do
  table=$(section "$work/README.md" | sed -n "/^#### Budget \`$budget\`/,/^Searched KL/p")
  for row in '**searched (dash)**' even first-K last-K 'random (median of 5)' kl-guided 'all softmax (teacher)'; do
    check "$budget: a row for $row" grep -qF "| $row |" <<<"$table"
  done
  check "$budget: the search's tokens and time" grep -q '^Search on cpu: 40,960 tokens' <<<"$table"
  check "$budget: both verdicts" grep -q 'below every baseline.*retrieval ≥ the best' <<<"$table"
done
check "the preparation's tokens and time" grep -q '^Preparation (once, shared by every budget): 4,096 tokens' \
  <(section "$work/README.md")
check "the README links the figure" grep -qF '](docs/results.svg)' <(section "$work/README.md")
# The random row's KL is the median of the seeds' KL in eval.json, shown to 3 digits.
median=$("$python" -c 'import json, statistics, sys
e = json.load(open(sys.argv[1]))
print(format(statistics.median(m["kl"] for m in e["methods"] if m["method"] == "random"), ".3g"))' \
  "$fixture/kv-0.5/eval.json")
check "the random row is the median of the seeds (KL $median)" \
  grep -qF "| random (median of 5) | 0.438 | $median |" <(section "$work/README.md")
check "the figure is well-formed SVG" "$python" -c \
  'import sys, xml.etree.ElementTree as t; assert t.parse(sys.argv[1]).getroot().tag.endswith("svg")' \
  "$work/docs/results.svg"

cp "$work/README.md" "$work/first.md"
"${render[@]}" --readme "$work/README.md" --figure "$work/docs/results.svg" >/dev/null 2>&1
check "rendering again changes nothing" cmp -s "$work/README.md" "$work/first.md"

printf '# no markers\n' >"$work/bare.md"
"${render[@]}" --readme "$work/bare.md" --figure "$work/bare.svg" >"$work/bare.log" 2>&1
check "a README without the markers is refused" test $? -ne 0
check "the refusal names the markers" grep -qF 'search-results:begin' "$work/bare.log"

[ "$failures" -eq 0 ] && echo "all passed" || echo "$failures failed"
exit $((failures > 0))
