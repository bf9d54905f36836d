#!/bin/sh
# Create the Mosquitto password file for edge_bms (hashed; mosquitto_passwd never stores
# plain text). Passwords come from the environment so they stay out of shell history:
#
#   EDGE_BMS_PW=... OPERATOR_PW=... PACK_PW=... ./make_passwd.sh /etc/mosquitto/edge_bms.passwd rack1-p01 rack1-p02
#
# The service then reads its own from EDGE_BMS_MQTT_USERNAME=edge-bms / EDGE_BMS_MQTT_PASSWORD.
set -eu
out=${1:?usage: make_passwd.sh PASSWORD_FILE [PACK_ID ...]}
shift
: "${EDGE_BMS_PW:?set EDGE_BMS_PW}" "${OPERATOR_PW:?set OPERATOR_PW}"
umask 077
rm -f "$out"
touch "$out"
mosquitto_passwd -b "$out" edge-bms "$EDGE_BMS_PW"
mosquitto_passwd -b "$out" operator "$OPERATOR_PW"
for pack in "$@"; do
    mosquitto_passwd -b "$out" "$pack" "${PACK_PW:?set PACK_PW for the pack users}"
done
echo "wrote $out: edge-bms, operator${1:+ and $# pack user(s)}"
