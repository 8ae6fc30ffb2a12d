# Sourced by docker/build-image and docker/build-fault-image: the one way this project builds an
# image without a registry, skipping it when its context did not change.
#
# build_image IMAGE CONTEXT DOCKER-BUILD-ARGS...: `docker build` of CONTEXT tagged IMAGE, with the
# hash of every file of CONTEXT in the label `latticed.context`; nothing is built when IMAGE
# already carries that hash.
build_image() {
  local img="$1" ctx="$2"; shift 2
  local hash
  hash="$(cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)"
  if [[ "$(docker image inspect -f '{{index .Config.Labels "latticed.context"}}' "$img" 2>/dev/null)" == "$hash" ]]; then
    echo "$(basename "$0"): $img is up to date"
    return
  fi
  local out
  if ! out="$(docker build -q --label "latticed.context=$hash" -t "$img" "$@" "$ctx" 2>&1)"; then
    echo "$out" >&2
    return 1
  fi
  echo "$(basename "$0"): built $img"
}

# image_sizes IMAGE...: one line per image with its size in MB.
image_sizes() {
  local img size
  for img in "$@"; do
    size="$(docker image inspect -f '{{.Size}}' "$img")"
    awk -v me="$(basename "$0")" -v img="$img" -v size="$size" \
      'BEGIN { printf "%s: %-26s %6.1f MB\n", me, img, size / 1e6 }'
  done
}
