#!/usr/bin/env python3
"""Splits one rendered overlay for the offline checks (scripts/check-deploy.sh)
and checks what no schema covers.

Usage: check-kubernetes-render.py RENDERED OUT_DIR

Writes OUT_DIR/objects.yaml (the objects with a Kubernetes schema, for
kubernetes-validate) and, when the render has a PrometheusRule,
OUT_DIR/rules.yml (its spec, for promtool; gen-kubernetes-monitoring.py
--check keeps it equal to the rules file). Fails when:
- a ServiceMonitor selects no Service, or names a port that Service lacks;
- a Deployment's terminationGracePeriodSeconds is not above
  server.shutdown_delay + server.shutdown_grace of its configuration;
- a container's probe names a port the container does not declare;
- a Deployment sets a backend.nats key that was removed;
- the streams eventflow asks for (backend.nats.backlog_max_bytes +
  idempotency_max_bytes + 2 x history_max_bytes + dead_letter_max_bytes,
  reserved on every node)
  do not fit the NATS servers' max_file_store, or their volume is smaller
  than that.
"""

import re
import sys
import tomllib

import yaml

CUSTOM_KINDS = {"PrometheusRule", "ServiceMonitor"}
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40,
              "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def size_bytes(text: str) -> int:
    """A size as nats-server (10G, 54Gi, 1GB) or Kubernetes (60Gi) writes it."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def check_stream_reservations(objects, errors):
    """eventflow's streams fit every NATS node's store, and the store its volume."""
    stores = []
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for text in obj.get("data", {}).values():
                match = re.search(r"^\s*max_file_store:\s*(\S+)", text, re.M)
                if match:
                    stores.append(size_bytes(match.group(1)))
    if not stores:
        return
    store = min(stores)
    for obj in objects:
        if obj["kind"] == "StatefulSet":
            for claim in obj["spec"].get("volumeClaimTemplates", []):
                volume = size_bytes(claim["spec"]["resources"]["requests"]["storage"])
                if volume < store:
                    errors.append(f"StatefulSet {obj['metadata']['name']}: volume {volume} bytes is "
                                  f"smaller than max_file_store {store}")
        if obj["kind"] != "Deployment":
            continue
        env = {e["name"]: e.get("value") for c in obj["spec"]["template"]["spec"]["containers"]
               for e in c.get("env", [])}
        if env.get("EVENTFLOW__BACKEND__KIND") != "nats":
            continue
        # The service's defaults (src/config.rs) where the overlay sets none.
        removed = [name for name in env if name.removeprefix("EVENTFLOW__BACKEND__NATS__") in
                   ("MAX_BYTES", "MAX_AGE", "PUBLISHED_MAX_BYTES", "PUBLISHED_MAX_AGE",
                    "EVENTS_STREAM", "DUPLICATE_WINDOW")]
        if removed:
            errors.append(f"Deployment {obj['metadata']['name']}: {', '.join(removed)} "
                          "were removed (eventflow refuses to start with them)")
        backlog = int(env.get("EVENTFLOW__BACKEND__NATS__BACKLOG_MAX_BYTES") or 2**30)
        ids = int(env.get("EVENTFLOW__BACKEND__NATS__IDEMPOTENCY_MAX_BYTES") or 2**30)
        history = int(env.get("EVENTFLOW__BACKEND__NATS__HISTORY_MAX_BYTES") or 2**30)
        dead = int(env.get("EVENTFLOW__BACKEND__NATS__DEAD_LETTER_MAX_BYTES") or 2**26)
        wanted = backlog + ids + 2 * history + dead
        if wanted > store:
            errors.append(f"Deployment {obj['metadata']['name']}: the streams reserve {wanted} bytes "
                          f"(backlog + ids + 2 x history: published and failed, + dead letters), "
                          f"more than max_file_store {store}")


def seconds(text: str) -> float:
    """A humantime duration such as "10s", "1m" or "250ms", in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for value, unit in re.findall(r"(\d+)\s*(ms|s|m|h|d)", text):
        total += int(value) * units[unit]
    return total


def config_of(deployment, objects):
    """The TOML configuration a Deployment mounts, with its env overrides."""
    pod = deployment["spec"]["template"]["spec"]
    names = {v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] in names:
            for text in obj.get("data", {}).values():
                config = tomllib.loads(text)
                server = config.setdefault("server", {})
                for container in pod["containers"]:
                    for env in container.get("env", []):
                        key = env["name"].lower().removeprefix("eventflow__server__")
                        if env["name"].startswith("EVENTFLOW__SERVER__") and "value" in env:
                            server[key] = env["value"]
                return config
    return None


def main() -> int:
    rendered, out_dir = sys.argv[1:3]
    with open(rendered, encoding="utf-8") as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    errors = []

    plain = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    with open(f"{out_dir}/objects.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump_all(plain, f, sort_keys=False)

    for rule in (o for o in objects if o["kind"] == "PrometheusRule"):
        with open(f"{out_dir}/rules.yml", "w", encoding="utf-8") as f:
            yaml.safe_dump(rule["spec"], f, sort_keys=False)

    services = [o for o in objects if o["kind"] == "Service"]
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        name = monitor["metadata"]["name"]
        wanted = monitor["spec"]["selector"].get("matchLabels", {})
        matched = [s for s in services
                   if s["metadata"].get("namespace") == monitor["metadata"].get("namespace")
                   and wanted.items() <= s["metadata"].get("labels", {}).items()]
        if not matched:
            errors.append(f"ServiceMonitor {name}: selects no Service ({wanted})")
        for service in matched:
            ports = {p.get("name") for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                if endpoint.get("port") not in ports:
                    errors.append(f"ServiceMonitor {name}: Service {service['metadata']['name']} "
                                  f"has no port {endpoint.get('port')!r}")
        job_label = monitor["spec"].get("jobLabel")
        for service in matched:
            if job_label and service["metadata"]["labels"].get(job_label) != "eventflow":
                errors.append(f"ServiceMonitor {name}: job would not be \"eventflow\", "
                              "which the alert rules select")

    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        config = config_of(deployment, objects)
        if config is not None:
            server = config.get("server", {})
            # Above delay + grace: grace already counts from SIGTERM, so this
            # is a margin, and it holds whichever way the grace is read.
            needed = seconds(server.get("shutdown_delay", "0s")) + seconds(server.get("shutdown_grace", "30s"))
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace <= needed:
                errors.append(f"Deployment {name}: terminationGracePeriodSeconds {grace} is not above "
                              f"server.shutdown_delay + server.shutdown_grace ({needed:g} s)")
        for container in pod["containers"]:
            ports = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    errors.append(f"Deployment {name}: {probe} names port {port!r}, not declared")

    check_stream_reservations(objects, errors)

    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        return 1
    kinds = sorted({o["kind"] for o in objects})
    print(f"{len(objects)} objects ({', '.join(kinds)}): {len(plain)} for the schemas; "
          "monitors, grace periods, probe ports and stream reservations agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
