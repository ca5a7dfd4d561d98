# Shell helpers shared by the setup scripts (sourced, not run).

# apt_install_missing LABEL PACKAGE...: install the packages dpkg does not list as installed
# (idempotent: nothing to do, nothing touched).
apt_install_missing() {
  local label=$1 pkg
  shift
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    echo "$label: installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
