#!/usr/bin/env bash
# Build the image and smoke-test it: start a container, wait for /readyz, run one tiny model-free prompt, then
# stop it (SIGTERM) and expect the drained exit status 0. Uses docker, or podman, whichever has a working engine.
#
#   container/build_and_smoke.sh                      # builds comfy-endpoint:smoke
#   IMAGE=me/comfy-endpoint:1 BUILD_ARGS="--build-arg PRELOAD=checkpoints/x.safetensors" container/build_and_smoke.sh
#
# Exits 77 (the usual "skipped" status) when no container engine is usable here, 1 when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-comfy-endpoint:smoke}"
HOST_PORT="${HOST_PORT:-18188}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-300}"

engine=""
for candidate in docker podman; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
    engine="$candidate"
    break
  fi
done
if [ -z "$engine" ]; then
  echo "build_and_smoke: no usable container engine (docker or podman, with its daemon or service running);" \
       "nothing was built" >&2
  exit 77
fi

echo "build_and_smoke: building $IMAGE with $engine"
# shellcheck disable=SC2086  # BUILD_ARGS is a list of flags
"$engine" build ${BUILD_ARGS:-} -t "$IMAGE" .

container="$("$engine" run -d -p "127.0.0.1:$HOST_PORT:8188" -e COMFY_ENDPOINT_DRAIN_GRACE_S=10 "$IMAGE")"
cleanup() { "$engine" rm -f "$container" >/dev/null 2>&1 || true; }
trap cleanup EXIT

python3 - "$HOST_PORT" "$READY_TIMEOUT_S" <<'PY'
import json, sys, time, urllib.error, urllib.request

port, timeout = sys.argv[1], float(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            if response.status == 200:
                break
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit(f"build_and_smoke: /readyz did not answer 200 within {timeout:.0f} s")
    time.sleep(1)
print("build_and_smoke: /readyz 200")

prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "smoke"}}}
request = urllib.request.Request(f"{base}/api/v1/prompts", data=json.dumps(prompt).encode(),
                                 headers={"Content-Type": "application/json", "Accept": "image/png"})
with urllib.request.urlopen(request, timeout=120) as response:
    body = response.read()
if response.status != 200 or not body.startswith(b"\x89PNG\r\n\x1a\n"):
    sys.exit(f"build_and_smoke: the prompt answered {response.status} without a PNG")
print(f"build_and_smoke: one prompt, {len(body)} bytes of PNG")
PY

"$engine" stop -t 30 "$container" >/dev/null
status="$("$engine" inspect -f '{{.State.ExitCode}}' "$container")"
if [ "$status" != "0" ]; then
  echo "build_and_smoke: the container exited with $status after SIGTERM (expected 0, a clean drain)" >&2
  "$engine" logs "$container" 2>&1 | tail -40 >&2
  exit 1
fi
echo "build_and_smoke: drained and exited 0; $IMAGE is good"
