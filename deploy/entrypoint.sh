#!/bin/sh
# The image's entrypoint: runs the command it is given (`serve` unless told otherwise) in its own place (exec), so
# that command is the container's first process and gets `docker stop`'s SIGTERM.
#
# Before `train`, it checks that the folder the run will write into (--out, default model_store, which is
# /app/model_store; or the --resume folder) is writable by the container's user. A host folder mounted there
# usually belongs to the host's user, not to the image's uid 10001, and train would fail with a PermissionError
# traceback after reading its data; this says in one line what to run instead.
set -eu

if [ "${1:-}" = train ]; then
    target=model_store
    previous=
    for argument in "$@"; do
        case $previous in --out | --resume) target=$argument ;; esac
        case $argument in --out=* | --resume=*) target=${argument#*=} ;; esac
        previous=$argument
    done
    folder=$target
    while [ ! -e "$folder" ]; do folder=$(dirname "$folder"); done  # train creates the rest
    if [ ! -w "$folder" ] || [ ! -x "$folder" ]; then
        where=$(cd "$folder" 2>/dev/null && pwd || echo "$folder")
        echo "train: this container's user (uid $(id -u)) cannot write to $where, a folder mounted from the host;" \
            "on the host, run \`sudo chown -R $(id -u) FOLDER\` on that folder (compose: \`sudo chown -R $(id -u)" \
            "model_store\`) or run the container as its owner (\`--user \"\$(id -u)\"\`), then train again" >&2
        exit 2
    fi
fi

exec "$@"
