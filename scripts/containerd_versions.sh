#!/usr/bin/env bash
# Fetch and unpack the containerd releases tests/test_containerd_versions.py runs against (1.7 from
# Debian trixie, 2.1 from sid) into $PEERPULL_CONTAINERD_CACHE/<version>/bin, and print one
# "<version> <bin dir>" line each. A no-op for a release already unpacked.
#
# Debian's archive, not the Go module proxy (which does not resolve here): apt-get with private
# lists and a private sources.list, so the host's apt configuration and packages stay as they are.
# The .deb is only unpacked (dpkg-deb -x), never installed. Needs root only for the default cache.
set -euo pipefail
CACHE=${PEERPULL_CONTAINERD_CACHE:-/var/cache/peerpull-containerd}
# version, Debian suite, the Debian package version to pin (the one the tests were run against)
RELEASES=("1.7.24 trixie 1.7.24~ds1-6+deb13u1" "2.1.9 sid 2.1.9+ds1-5")

apt_dir=$CACHE/apt
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
          -o "Dir::Etc::Preferences=$apt_dir/preferences" -o "Dir::Etc::PreferencesParts=$apt_dir/preferences.d"
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "Dir::Cache=$apt_dir/cache" -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")

updated=""
update_lists() {
  [ -n "$updated" ] && return
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/cache" "$apt_dir/preferences.d"
  if [ ! -f "$apt_dir/sources.list" ]; then
    {
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main"
    } >"$apt_dir/sources.list"
  fi
  apt-get "${apt_opts[@]}" update -qq >&2
  updated=yes
}

for release in "${RELEASES[@]}"; do
  read -r version suite debversion <<<"$release"
  dest=$CACHE/$version
  if [ -x "$dest/bin/containerd" ] && [ -x "$dest/bin/ctr" ] && [ -x "$dest/bin/containerd-shim-runc-v2" ]; then
    echo "$version $dest/bin"
    continue
  fi
  deb=$(ls "$apt_dir"/archives/containerd_"${debversion//\~/%7e}"_*.deb "$apt_dir"/archives/containerd_"$debversion"_*.deb \
        2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    update_lists
    (cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" download -qq "containerd=$debversion" >&2)
    deb=$(ls "$apt_dir"/archives/containerd_*"${version}"*_*.deb | head -n1)
  fi
  echo "containerd_versions: unpacking $deb ($suite)" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  dpkg-deb -x "$deb" "$work"
  mkdir -p "$dest/bin"
  for tool in containerd ctr containerd-shim containerd-shim-runc-v1 containerd-shim-runc-v2; do
    [ -x "$work/usr/bin/$tool" ] && install -m 0755 "$work/usr/bin/$tool" "$dest/bin/$tool"
  done
  dpkg-deb -f "$deb" Version >"$dest/debian-version"
  rm -rf "$work"
  trap - EXIT
  "$dest/bin/containerd" --version >&2
  echo "$version $dest/bin"
done
