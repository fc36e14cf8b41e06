#!/usr/bin/env bash
# Check that marsm-dist builds and installs the way the README tells users to install it:
#  1. build the sdist and the wheel (python -m build) and `twine check --strict` them;
#  2. check their contents: the wheel holds marsm_dist/ (with py.typed) and its dist-info only,
#     no tests, no __pycache__; the versions in METADATA, pyproject.toml and
#     marsm_dist.__version__ agree;
#  3. in a new virtual environment outside the repository, install torch as launch/setup.sh does
#     (launch/install_torch.sh), then the wheel, and run the README's first ```python block from a
#     directory outside the repository;
#  4. replace it with `pip install "marsm-dist[deepspeed] @ git+file://<this repo>"` (the
#     repository's HEAD, as a user's `git+https://` install gets it): its version must be HEAD's,
#     deepspeed must import, and torch must still be the one installed in step 3.
# About 1.5 minutes on 2 CPU cores. The build tools come from the project's venv (the [dev] extra).
# MARSM_EXAMPLE=FILE runs FILE instead of the README's block; MARSM_KEEP_WORK=1 keeps the
# temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bash launch/setup.sh dev
py="${MARSM_VENV:-.venv}/bin/python"
work="$(mktemp -d "${TMPDIR:-/tmp}/marsm-package-check.XXXXXX")"
if [ "${MARSM_KEEP_WORK:-0}" = 1 ]; then
    echo "package_check: working in $work (kept)"
else
    trap 'rm -rf "$work"' EXIT
fi
start=$SECONDS
step() { echo "package_check: [$((SECONDS - start)) s] $*"; }
quiet() {  # run a command; show its output only when it fails
    if ! "$@" > "$work/last.log" 2>&1; then
        cat "$work/last.log"
        echo "package_check: FAILED: $*" >&2
        exit 1
    fi
}

version="$("$py" - <<'EOF'
import re
text = open("pyproject.toml").read()
print(re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1))
EOF
)"
step "building the sdist and the wheel of marsm-dist $version"
quiet "$py" -m build --outdir "$work/dist" .
quiet "$py" -m twine check --strict "$work"/dist/*
wheel="$(ls "$work"/dist/marsm_dist-*.whl)"
sdist="$(ls "$work"/dist/marsm_dist-*.tar.gz)"

step "checking their contents"
"$py" - "$wheel" "$sdist" "$version" <<'EOF'
import re
import sys
import tarfile
import zipfile
from email.parser import Parser

wheel, sdist, version = sys.argv[1:]
errors = []
init = open("marsm_dist/__init__.py").read()
init_version = re.search(r'(?m)^__version__\s*=\s*"([^"]+)"', init).group(1)
if init_version != version:
    errors.append(f"marsm_dist.__version__ is {init_version}, pyproject.toml says {version}")
names = zipfile.ZipFile(wheel).namelist()
info = f"marsm_dist-{version}.dist-info/"
strays = [n for n in names if not (n.startswith("marsm_dist/") or n.startswith(info))]
errors += [f"wheel: {n} is outside marsm_dist/" for n in strays]
errors += [f"wheel: {n}" for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
if "marsm_dist/py.typed" not in names:
    errors.append("wheel: marsm_dist/py.typed is missing")
if "marsm_dist/demo/__main__.py" not in names:
    errors.append("wheel: marsm_dist/demo/ is missing")
meta = Parser().parsestr(zipfile.ZipFile(wheel).read(info + "METADATA").decode())
if meta["Version"] != version:
    errors.append(f"wheel METADATA: Version {meta['Version']}, pyproject.toml says {version}")
if meta["Description-Content-Type"] != "text/markdown":
    errors.append(f"wheel METADATA: Description-Content-Type {meta['Description-Content-Type']}")
members = [m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m]
for need in ("PKG-INFO", "pyproject.toml", "README.md", "marsm_dist/__init__.py", "marsm_dist/py.typed"):
    if need not in members:
        errors.append(f"sdist: {need} is missing")
errors += [f"sdist: {m}" for m in members if m.startswith("tests/") or "__pycache__" in m]
for e in errors:
    print("package_check:", e, file=sys.stderr)
py_files = sum(n.endswith(".py") for n in names)
print(f"package_check: wheel {len(names)} files ({py_files} .py), sdist {len(members)} entries")
sys.exit(1 if errors else 0)
EOF

# The example: the README's first ```python block (or MARSM_EXAMPLE), run from outside the repo.
mkdir -p "$work/run"
if [ -n "${MARSM_EXAMPLE:-}" ]; then
    cp "$MARSM_EXAMPLE" "$work/run/example.py"
else
    "$py" - README.md "$work/run/example.py" <<'EOF'
import re
import sys

lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
block, fence = None, None
for line in lines:
    if fence is None:
        m = re.match(r"^ {0,3}(`{3,})\s*(python3?|py)\s*$", line)
        if m:
            fence, block = m.group(1), []
    elif re.match(r"^ {0,3}" + fence + r"`*\s*$", line):
        break
    else:
        block.append(line)
if not block:
    sys.exit("package_check: README.md has no ```python block")
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(block) + "\n")
EOF
fi

venv="$work/venv"
vpy="$venv/bin/python"
# Python in the new venv, run outside the repository (from here, this checkout's marsm_dist and
# its marsm_dist.egg-info would be found first).
vrun() { (cd "$work/run" && env -u PYTHONPATH "$vpy" "$@"); }
torch_version() { vrun -c "import importlib.metadata as m; print(m.version('torch'))"; }
run_example() {  # $1: what was installed
    (
        cd "$work/run"
        # The installed package, not this checkout's, must be the one imported.
        env -u PYTHONPATH "$vpy" -c "
import importlib.metadata as m, marsm_dist, sys
assert marsm_dist.__file__.startswith(sys.prefix), marsm_dist.__file__
print(f'package_check: marsm_dist {marsm_dist.__version__} (metadata {m.version(\"marsm-dist\")}) from {marsm_dist.__file__}')
" || exit 1
        step "running the README's first python block ($1)"
        limit=()
        if command -v timeout > /dev/null; then limit=(timeout 300); fi
        if ! env -u PYTHONPATH ${limit[@]+"${limit[@]}"} "$vpy" example.py > "$work/example.log" 2>&1; then
            cat "$work/example.log"
            echo "package_check: FAILED: the README example ($work/run/example.py) with $1" >&2
            exit 1
        fi
        tail -n 3 "$work/example.log" | sed 's/^/    /'
    )
}

step "new virtual environment $venv; torch as launch/setup.sh installs it"
quiet "${PYTHON:-python3}" -m venv "$venv"
# As launch/setup.sh does (Python 3.11's own pip 23.2 refuses `name @ git+file:///path` URLs).
quiet vrun -m pip install --disable-pip-version-check -U pip
bash launch/install_torch.sh "$vpy"
torch_installed="$(torch_version)"
step "pip install $(basename "$wheel")   (torch $torch_installed)"
quiet vrun -m pip install --disable-pip-version-check "$wheel"
run_example "the wheel"

head="$(git rev-parse HEAD)"
step "pip install \"marsm-dist[deepspeed] @ git+file://$root@${head:0:12}\"   (HEAD)"
quiet vrun -m pip uninstall -y --disable-pip-version-check marsm-dist
quiet vrun -m pip install --disable-pip-version-check "marsm-dist[deepspeed] @ git+file://$root@$head"
head_version="$(git show HEAD:pyproject.toml | sed -n 's/^version *= *"\(.*\)"/\1/p')"
installed="$(vrun -c "import importlib.metadata as m; print(m.version('marsm-dist'))")"
if [ "$installed" != "$head_version" ]; then
    echo "package_check: FAILED: git install gave marsm-dist $installed, HEAD's pyproject.toml says $head_version" >&2
    exit 1
fi
vrun -c "import deepspeed" > /dev/null 2>&1 || { echo "package_check: FAILED: the [deepspeed] extra did not install deepspeed" >&2; exit 1; }
if [ "$(torch_version)" != "$torch_installed" ]; then
    echo "package_check: FAILED: installing marsm-dist[deepspeed] replaced torch $torch_installed by $(torch_version)" >&2
    exit 1
fi
vrun -c "import marsm_dist, sys; assert marsm_dist.__file__.startswith(sys.prefix); print('package_check: imported', marsm_dist.__file__)"
step "OK: marsm-dist $version builds, passes twine check and installs from its wheel and from git"
