# Source me (bash): venv + this package's install space + loopback-only DDS for tests, demo and benchmarks.
#   source scripts/env.sh
# The loopback profile is set here, never inside the node: a robot needs its real network.
_ovseg_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "${OVSEG_VENV:-$_ovseg_root/.venv}/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
# colcon's setup scripts are not `set -u` clean.
_ovseg_u=$(set +o | grep nounset); set +u
# shellcheck disable=SC1091
source "$_ovseg_root/install/setup.bash"
eval "$_ovseg_u"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export FASTDDS_DEFAULT_PROFILES_FILE="$_ovseg_root/config/fastdds_loopback.xml"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-77}"
export HF_HUB_OFFLINE=1
export OVSEG_ROOT="$_ovseg_root"
unset _ovseg_root _ovseg_u
