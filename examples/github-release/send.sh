#!/bin/sh
# Sends payload.json to a runner the way GitHub does: signed with HMAC-SHA256
# of the body (X-Hub-Signature-256) and with a delivery id. Sending it twice
# with the same id returns the same task.
set -eu
here=$(dirname "$0")
url=${FLOTILLA_SERVER:-http://127.0.0.1:7878}/v1/hooks/github-release
secret=${GITHUB_HOOK_SECRET:-change-me}
delivery=${DELIVERY:-$(date +%s)}
sig=$(openssl dgst -sha256 -hmac "$secret" -r < "$here/payload.json" | cut -d' ' -f1)
curl -sS -X POST "$url" \
    -H "Content-Type: application/json" \
    -H "X-GitHub-Event: release" \
    -H "X-GitHub-Delivery: $delivery" \
    -H "X-Hub-Signature-256: sha256=$sig" \
    --data-binary "@$here/payload.json"
echo
