#!/usr/bin/env bash
# Build the wheel with `python -m build`, install it into a fresh venv outside the
# checkout, and run `twoway demo` and `twoway init` there: the samples and the pages of
# `twoway serve` must ship inside the package.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/dist/twoway-*.whl 2>&1 | grep -v -i '^warning' || true
mkdir "$work/elsewhere"
cd "$work/elsewhere"
env -u PYTHONPATH -u TWOWAY_CONFIG "$work/venv/bin/twoway" demo --dir ws >demo.out
grep -q "Prospects (2)" demo.out || { cat demo.out; echo "wheel: twoway demo failed"; exit 1; }
env -u PYTHONPATH "$work/venv/bin/twoway" init acme >/dev/null
diff -r "$root/templates" acme/templates
env -u PYTHONPATH "$work/venv/bin/python" -c "
from worker.rendering import Pages
p = Pages()
assert 'twoway console' in p.render('login.html', next='/console', error=None)
assert '--accent' in p.static('console.css')"
echo "wheel: built, installed outside the checkout, twoway demo and init OK in $((SECONDS - started)) s"
