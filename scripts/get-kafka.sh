#!/usr/bin/env bash
# Prints the directory holding Apache Kafka's jars on stdout (logs go to
# stderr): a broker runs from it in KRaft mode with
#   java -cp "$KAFKA_LIB/*" kafka.Kafka server.properties
# and the admin tools with e.g.
#   java -cp "$KAFKA_LIB/*" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ...
#
# There is no Kafka package in Debian and no download site reachable here,
# but Maven Central is: the broker (org.apache.kafka:kafka_2.13) and its tools
# (org.apache.kafka:kafka-tools) with their runtime dependencies are copied by
# `mvn dependency:copy-dependencies` from a generated pom. Cached (with Maven's
# own repository) in ${WASMSUB_CACHE:-~/.cache/wasmsub}/kafka-<version>/lib,
# keyed by the version; $KAFKA_LIB wins when it already holds the jars.
set -euo pipefail

# Kafka 4.1: KRaft only (no ZooKeeper), `kafka-storage format --standalone`.
KAFKA_VERSION=4.1.1
SCALA_BINARY=2.13
# The slf4j-api version Kafka $KAFKA_VERSION depends on.
SLF4J_VERSION=1.7.36

log() { echo "get-kafka: $*" >&2; }

if [[ -n "${KAFKA_LIB:-}" ]]; then
  if compgen -G "$KAFKA_LIB/kafka_$SCALA_BINARY-*.jar" >/dev/null; then echo "$KAFKA_LIB"; exit 0; fi
  log "ignoring KAFKA_LIB=$KAFKA_LIB: no kafka_$SCALA_BINARY jar in it"
fi

cache="${WASMSUB_CACHE:-$HOME/.cache/wasmsub}"
dir="$cache/kafka-$KAFKA_VERSION-slf4j-$SLF4J_VERSION"
# The mark is written last: a directory without it is an interrupted copy.
if [[ -f "$dir/.complete" ]]; then echo "$dir/lib"; exit 0; fi

# Java 17+ runs Kafka 4 (Debian 12's default JRE is 17); Maven fetches it.
command -v java >/dev/null || bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" default-jre-headless
command -v mvn >/dev/null || bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" maven
mkdir -p "$cache"
# One install at a time per cache; whoever waited re-checks for the result.
exec 9>"$cache/.kafka-install.lock"
flock 9
if [[ -f "$dir/.complete" ]]; then echo "$dir/lib"; exit 0; fi

rm -rf "$dir"
mkdir -p "$dir"
log "copying Kafka $KAFKA_VERSION's jars from Maven Central into $dir/lib"
cat >"$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>wasmsub.tests</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$SCALA_BINARY</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka logs through SLF4J 1.7 and ships no binding in these jars:
         without one the broker says nothing. The simple binding writes to
         stderr, which the tests keep in the broker's log file. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
# Maven's repository stays in the cache too, so a rebuild downloads nothing.
# (Debian's mvn prints colour resets even in batch mode: stripped.)
mvn -B -q -f "$dir/pom.xml" -Dmaven.repo.local="$cache/maven-repository" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dir/lib" 2>&1 \
  | sed 's/\x1b\[[0-9;]*m//g' >&2
compgen -G "$dir/lib/kafka_$SCALA_BINARY-$KAFKA_VERSION.jar" >/dev/null \
  || { log "no kafka_$SCALA_BINARY-$KAFKA_VERSION.jar after the copy"; exit 1; }
touch "$dir/.complete"
log "$(ls "$dir/lib" | wc -l) jars in $dir/lib"
echo "$dir/lib"
