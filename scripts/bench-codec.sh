#!/usr/bin/env bash
# Reproduces the codec figures of docs/benchmarks.md: generates the benchmark images and runs
# `pagestream codec bench` on each, printing one JSON report per line (image name first).
#   scripts/bench-codec.sh [DIR] [REPEAT]
# DIR (default /tmp/pagestream-bench) receives the images: about 3.8 GiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-/tmp/pagestream-bench}
repeat=${2:-5}
mkdir -p "$dir"
cargo build --release --locked -q
bin=target/release/pagestream

# name size mix
images=(
    "mix-256m 256M zero=30,text=16,ints=12,ptrs=12,code=10,random=8,dup=12"
    "nodup-256m 256M zero=30,text=18,ints=14,ptrs=14,code=14,random=10"
    "duprich-256m 256M zero=20,text=15,ints=10,ptrs=10,code=10,random=5,dup=30"
    "mix-1g 1G zero=30,text=16,ints=12,ptrs=12,code=10,random=8,dup=12"
    "nodup-1g 1G zero=30,text=18,ints=14,ptrs=14,code=14,random=10"
    "duprich-1g 1G zero=20,text=15,ints=10,ptrs=10,code=10,random=5,dup=30"
)
for entry in "${images[@]}"; do
    read -r name size mix <<<"$entry"
    img="$dir/$name.img"
    [ -f "$img" ] || "$bin" codec gen --size "$size" --mix "$mix" --seed 1 -o "$img" >/dev/null
    for threads in 1 2; do
        report=$("$bin" codec bench --image "$img" --json --repeat "$repeat" --threads "$threads")
        printf '%s threads=%s %s\n' "$name" "$threads" "$(tr -d ' \n' <<<"$report")"
    done
done
